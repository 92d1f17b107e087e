"""docs/proofs.md names, for each claim, the tests that prove it: every test it names exists (a
function of that name in that file, found by parsing the file), and every invariant has a row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import REPO

PROOFS = REPO / "docs" / "proofs.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
INVARIANT_ROW = re.compile(r"^\| Invariant (\d+)\. ")
INVARIANTS = 14


def _test_functions(path: Path) -> set[str]:
    """The names of the functions the file defines, at its top level and in its classes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def references(text: str) -> list[tuple[str, str]]:
    return [(match[1], match[2]) for match in REFERENCE.finditer(text)]


def missing(text: str) -> list[str]:
    """The ``file::test`` references of ``text`` that name no existing test."""
    found: dict[str, set[str]] = {}
    absent = []
    for file, name in references(text):
        path = REPO / file
        if file not in found:
            found[file] = _test_functions(path) if path.is_file() else set()
        if name not in found[file]:
            absent.append(f"{file}::{name}")
    return absent


def test_every_test_named_in_the_proofs_table_exists() -> None:
    text = PROOFS.read_text()
    assert len(references(text)) >= INVARIANTS
    assert missing(text) == []


def test_every_invariant_has_a_row_naming_a_test() -> None:
    rows = {
        int(match[1]): line
        for line in PROOFS.read_text().splitlines()
        if (match := INVARIANT_ROW.match(line))
    }
    assert sorted(rows) == list(range(1, INVARIANTS + 1))
    assert all(references(line) for line in rows.values())


def test_the_check_finds_a_renamed_or_removed_test() -> None:
    this = "tests/test_proofs.py"
    assert missing(f"`{this}::test_every_invariant_has_a_row_naming_a_test`") == []
    assert missing(f"`{this}::test_that_was_renamed`") == [f"{this}::test_that_was_renamed"]
    assert missing("`tests/no_such_file.py::test_x`") == ["tests/no_such_file.py::test_x"]
