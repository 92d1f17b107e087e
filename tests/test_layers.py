"""Imports run one way: the faces (``portal``) over the engine (``provisioning``) over the domain
(``workspaces``); ``project`` (settings, urls, entry points, the Celery app) sits on top and
none of them imports it. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each package and what it may not import.
FORBIDDEN = {
    "workspaces": ("provisioning", "portal", "project"),
    "provisioning": ("portal", "project"),
    "portal": ("project",),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_the_guard_sees_every_kind_of_import() -> None:
    source = "import provisioning.gate\ndef f():\n    from portal import admin\n"
    assert imported_modules(source) == [(1, "provisioning.gate"), (3, "portal")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package: str) -> None:
    offenders = []
    scanned = 0
    for path in (REPO / package).rglob("*.py"):
        scanned += 1
        for line, module in imported_modules(path.read_text()):
            if module.split(".")[0] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert scanned > 5
    assert not offenders, "imports against the layers: " + ", ".join(offenders)
