"""Invariant 10: one backend selector, and an unknown or unreachable backend fails at once."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import lifecycle
from provisioning.backends import backend_for, reset_backends
from provisioning.backends.base import BackendUnavailable
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import EventSource, EventType, WorkspaceStatus

REPO = Path(__file__).resolve().parents[2]
# Constructing any of these is constructing a backend or an engine client.
CONSTRUCTORS = {
    "ProcessBackend",
    "DockerBackend",
    "SwarmBackend",
    "DockerClient",
    "APIClient",
    "from_env",
}
# The selector and the backends themselves; tests build backends directly on purpose, and the
# benchmarks drive the bare engine on purpose (it is the floor they compare the platform with).
ALLOWED = (REPO / "provisioning" / "backends", REPO / "tests", REPO / "bench", REPO / ".venv")


# The selector's internals: reaching them is building a backend behind backend_for's back.
SELECTOR_INTERNALS = {"FACTORIES", "_construct"}


def backend_constructions(source: str) -> list[str]:
    """Where ``source`` names a backend or engine-client constructor or the selector's factory
    table, in any form: a call (``DockerBackend()``, ``docker.from_env()``), an import (so an
    alias, ``from … import DockerBackend as B``, is caught where it is made), a bare reference
    (a factory table ``{"docker": DockerBackend}``, ``partial(DockerBackend)``), or a string
    (``getattr(module, "DockerBackend")``, ``import_string("….DockerBackend")``)."""
    names = CONSTRUCTORS | SELECTOR_INTERNALS
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id in names:
            found.append(f"{node.lineno} {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{node.lineno} .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name.rsplit(".", 1)[-1] in names:
                    found.append(f"{node.lineno} import {alias.name}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.rsplit(".", 1)[-1] in names
        ):
            found.append(f"{node.lineno} {node.value!r}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "from provisioning.backends.process import ProcessBackend\nProcessBackend()",
        "import provisioning.backends.docker as d\nd.DockerBackend()",
        "from provisioning.backends.swarm import SwarmBackend\nSwarmBackend()",
        "from provisioning.backends.docker import DockerBackend as Fast\nFast()",
        "from docker import DockerClient as C\nC(base_url='unix://x')",
        "import docker\nclient = docker.from_env()",
        "import docker\nlow = docker.APIClient()",
        "TABLE = {'docker': docker_module.DockerBackend}\nTABLE['docker']()",
        "import functools\nmake = functools.partial(backends.ProcessBackend, root)",
        "cls = getattr(module, 'DockerBackend')\ncls()",
        "cls = import_string('provisioning.backends.docker.DockerBackend')",
        "from provisioning.backends import FACTORIES\nFACTORIES['docker']()",
        "from provisioning import backends\nbackends._construct('docker')",
    ],
)
def test_the_selector_guard_catches_every_way_of_building_a_backend(snippet: str) -> None:
    assert backend_constructions(snippet), snippet


def test_the_selector_guard_passes_the_selector() -> None:
    source = "from provisioning.backends import backend_for\nbackend = backend_for(workspace)\n"
    assert backend_constructions(source) == []


def test_no_code_outside_the_backends_constructs_a_backend_or_engine_client() -> None:
    offenders = []
    scanned = 0
    for path in REPO.rglob("*.py"):
        if any(path.is_relative_to(allowed) for allowed in ALLOWED):
            continue
        scanned += 1
        for where in backend_constructions(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(REPO)}:{where}")
    assert scanned > 20  # the scan really looked at the code base
    assert offenders == [], "construct backends only via provisioning.backends.backend_for"


def test_the_lifecycle_gets_its_backend_only_from_backend_for() -> None:
    source = (REPO / "provisioning" / "lifecycle.py").read_text()
    tree = ast.parse(source)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "provisioning.backends"
        for alias in node.names
    }
    assert imported == {"backend_for"}


@pytest.fixture
def fresh_backends() -> Iterator[None]:
    reset_backends()
    yield
    reset_backends()


def _failure(workspace: Workspace) -> dict:
    [event] = workspace.events.filter(type=EventType.PROVISION_FAILED).values("source", "payload")
    return dict(event)


@pytest.mark.django_db
def test_unknown_backend_fails_the_workspace_at_once_naming_it(user, fresh_backends) -> None:
    workspace = services.create_workspace(
        owner=user, name="nowhere", template="shell-default", backend="quantum"
    )
    assert lifecycle.converge(workspace.id) == ["provision"]
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert "'quantum'" in workspace.last_error
    assert "unknown backend" in workspace.last_error
    failure = _failure(workspace)
    assert failure["source"] == EventSource.BACKEND
    assert failure["payload"]["backend"] == "quantum"


@pytest.mark.django_db
def test_unreachable_docker_engine_fails_the_workspace_at_once(
    user, settings, tmp_path, fresh_backends
) -> None:
    settings.DOCKER_HOST = f"unix://{tmp_path}/stopped-engine.sock"
    workspace = services.create_workspace(
        owner=user, name="engine-down", template="shell-default", backend="docker"
    )
    with pytest.raises(BackendUnavailable):
        backend_for(workspace)
    assert lifecycle.converge(workspace.id) == ["provision"]
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert workspace.is_running is False
    assert "'docker'" in workspace.last_error
    assert "cannot reach the Docker engine" in workspace.last_error
    assert "stopped-engine.sock" in workspace.last_error
    assert _failure(workspace)["payload"]["backend"] == "docker"


@pytest.mark.django_db
def test_unreachable_swarm_manager_fails_the_workspace_at_once(
    user, settings, tmp_path, fresh_backends
) -> None:
    settings.SWARM_MANAGER_HOST = f"unix://{tmp_path}/stopped-manager.sock"
    workspace = services.create_workspace(
        owner=user, name="swarm-down", template="shell-default", backend="swarm"
    )
    with pytest.raises(BackendUnavailable):
        backend_for(workspace)
    assert lifecycle.converge(workspace.id) == ["provision"]
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert workspace.is_running is False
    assert "'swarm'" in workspace.last_error
    assert "stopped-manager.sock" in workspace.last_error
    assert _failure(workspace)["payload"]["backend"] == "swarm"
