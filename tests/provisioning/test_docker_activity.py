"""The sh agent (the Docker image's) reports activity like the Python one: a heartbeat after the
activity file was touched carries ``active: true`` and moves ``last_activity_at``; heartbeats
without a touch do not. Real worker, real engine, real agent."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from tests.support import docker_containers, wait_for
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.services.activity import _activity_key
from workspaces.status import WorkspaceStatus

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("use_session_templates"),
]
S = WorkspaceStatus


def test_touching_the_activity_file_is_reported_by_the_sh_agent(
    api, on_docker, docker_engine, registry_listener
) -> None:
    response = api.post(
        "/api/workspaces/", {"name": "busy", "template": "shell-fastbeat"}, format="json"
    )
    assert response.status_code == 201, response.content
    workspace_id = response.json()["id"]

    def online() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        assert row.status != S.FAILED, row.last_error
        return row if row.status == S.ONLINE and row.last_heartbeat_at else None

    row = wait_for(online, timeout=90, message="online with a heartbeat")
    [container] = docker_containers(docker_engine, workspace_id)
    # The activity write is rate-limited per workspace; start from a clean slate.
    get_redis().delete(_activity_key(row.id))

    # Heartbeats with no touch: last_activity_at stays where it is.
    def heartbeat_after(previous: Any) -> Any:
        seen = Workspace.objects.get(id=workspace_id).last_heartbeat_at
        return seen if seen > previous else None

    beat = row.last_heartbeat_at
    for _ in range(3):
        beat = wait_for(partial(heartbeat_after, beat), timeout=30, message="a heartbeat")
    quiet = Workspace.objects.get(id=workspace_id)
    assert quiet.last_activity_at == row.last_activity_at

    touched = container.exec_run(["sh", "-c", 'touch "$WORKSPACE_CONFIG_DIR/.activity"'])
    assert touched.exit_code == 0, touched.output
    wait_for(
        lambda: Workspace.objects.get(id=workspace_id).last_activity_at > row.last_activity_at,
        timeout=30,
        message="the touch reported as activity",
    )
