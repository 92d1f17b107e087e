"""The Swarm backend's selector on a real engine that is not a swarm manager: the workspace
fails at once, naming the backend and the engine (as an unreachable Docker engine does)."""

from __future__ import annotations

import pytest

from provisioning import lifecycle
from provisioning.backends import backend_named, reset_backends
from provisioning.backends.base import BackendUnavailable
from workspaces import services
from workspaces.status import WorkspaceStatus

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.django_db]
S = WorkspaceStatus


def test_an_engine_not_in_swarm_mode_fails_the_workspace_at_once(
    user, settings, docker_engine
) -> None:
    # The suite's plain engine (DOCKER_HOST) is no swarm manager.
    settings.SWARM_MANAGER_HOST = settings.DOCKER_HOST
    reset_backends()
    try:
        workspace = services.create_workspace(
            owner=user, name="no-swarm", template="shell-default", backend="swarm"
        )
        with pytest.raises(BackendUnavailable, match="not a swarm manager"):
            backend_named("swarm")
        assert lifecycle.converge(workspace.id) == ["provision"]
        workspace.refresh_from_db()
        assert workspace.status == S.FAILED
        assert "'swarm'" in workspace.last_error
        assert "not a swarm manager" in workspace.last_error
        assert settings.DOCKER_HOST in workspace.last_error
    finally:
        reset_backends()
