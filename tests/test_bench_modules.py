"""``python -m bench`` calls every module's ``run(repeats)`` in a child process: each module in
its list takes the runner's ``--repeats`` as its first argument (read from the source, so that no
module's imports run here)."""

from __future__ import annotations

import ast

import pytest

from bench.__main__ import MODULES
from tests.support import REPO


@pytest.mark.parametrize("name", MODULES)
def test_each_bench_module_runs_with_the_runners_repeats(name: str) -> None:
    tree = ast.parse((REPO / "bench" / f"{name}.py").read_text())
    runs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run"]
    assert len(runs) == 1, f"bench/{name}.py has no top-level run()"
    arguments = runs[0].args.posonlyargs + runs[0].args.args
    assert arguments and arguments[0].arg == "repeats", (
        f"bench/{name}.py: run() must take the runner's repeats first"
    )
