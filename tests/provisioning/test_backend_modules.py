"""The backends' modules import one way: no two of them import each other, directly or round a
circle, and the Swarm backend stands on the shared engine module, not on the Docker backend."""

from __future__ import annotations

import ast
from pathlib import Path

from provisioning.backends.docker import DockerBackend
from provisioning.backends.engine import EngineBackend
from provisioning.backends.swarm import SwarmBackend

BACKENDS = Path(__file__).resolve().parents[2] / "provisioning" / "backends"
PACKAGE = "provisioning.backends"


def imports_of(source: str) -> set[str]:
    """The modules of the backends package that ``source`` imports, by their short name (the
    package itself, ``__init__``, is the selector above them all and is left out)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                found.update(alias.name for alias in node.names)
            elif node.module.startswith(f"{PACKAGE}."):
                found.add(node.module.removeprefix(f"{PACKAGE}.").split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(f"{PACKAGE}."):
                    found.add(alias.name.removeprefix(f"{PACKAGE}.").split(".")[0])
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import path that comes back to where it started (depth-first, one per circle's
    first module found)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {
        "agent_image": imports_of("from provisioning.backends.docker import make_client"),
        "docker": imports_of("from provisioning.backends import agent_image, follow"),
        "follow": imports_of("import provisioning.backends.base"),
    }
    assert circles(graph) == [["agent_image", "docker", "agent_image"]]


def test_no_backend_module_imports_one_that_imports_it() -> None:
    graph = {
        path.stem: imports_of(path.read_text(encoding="utf-8")) - {path.stem}
        for path in BACKENDS.glob("*.py")
        if path.stem != "__init__"
    }
    assert len(graph) > 10 and graph["docker"]  # the scan really read the package
    assert circles(graph) == []


def test_swarm_is_built_on_the_engine_module_not_on_the_docker_backend() -> None:
    assert issubclass(SwarmBackend, EngineBackend)
    assert not issubclass(SwarmBackend, DockerBackend)
    assert "docker" not in imports_of((BACKENDS / "swarm.py").read_text(encoding="utf-8"))
