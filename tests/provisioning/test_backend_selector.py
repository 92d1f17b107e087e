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
CONSTRUCTORS = {"ProcessBackend", "DockerBackend", "DockerClient", "APIClient", "from_env"}
# The selector and the backends themselves; tests build backends directly on purpose, and the
# benchmarks drive the bare engine on purpose (it is the floor they compare the platform with).
ALLOWED = (REPO / "provisioning" / "backends", REPO / "tests", REPO / "bench", REPO / ".venv")


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def test_no_code_outside_the_backends_constructs_a_backend_or_engine_client() -> None:
    offenders = []
    scanned = 0
    for path in REPO.rglob("*.py"):
        if any(path.is_relative_to(allowed) for allowed in ALLOWED):
            continue
        scanned += 1
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node) in CONSTRUCTORS:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {_called_name(node)}(")
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
