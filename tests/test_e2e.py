"""End to end on the process backend, against the stack bin/run starts (tests/stack.py): its API
over HTTP, its worker, real agents."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from provisioning.backends.process_launch import alive
from tests.support import wait_for
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _status(api: Any, workspace_id: str) -> dict:
    response = api.get(f"/api/workspaces/{workspace_id}/")
    assert response.status_code == 200, response.content
    return response.json()


def _wait_status(api: Any, workspace_id: str, status: WorkspaceStatus, timeout: float = 30) -> dict:
    def check() -> dict | None:
        body = _status(api, workspace_id)
        assert body["status"] != WorkspaceStatus.FAILED or status == WorkspaceStatus.FAILED, body
        return body if body["status"] == status else None

    return wait_for(check, timeout=timeout, message=f"workspace {workspace_id} {status}")


def _pid(workspace_id: str) -> tuple[int, int]:
    state = Workspace.objects.get(id=workspace_id).backend_state
    return state["pid"], state["start_time"]


@pytest.fixture
def api(on_stack, user) -> Any:
    return on_stack.client(services.issue_api_token(user))


def test_post_to_online_then_stop_start_delete(api, on_stack) -> None:
    response = api.post(
        "/api/workspaces/",
        {"name": "e2e", "template": "shell-default", "env": {"GREETING": "hi"}},
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["status"] == WorkspaceStatus.PROVISIONING
    workspace_id = created["id"]

    online = _wait_status(api, workspace_id, WorkspaceStatus.ONLINE)
    # The seed failure: online always comes with is_running and last_started_at.
    assert online["is_running"] is True
    assert online["last_started_at"] is not None
    first_generation = online["generation"]
    pid, start_time = _pid(workspace_id)
    assert alive(pid, start_time)
    # The workspace env reached the process, and the platform's variables too.
    with open(f"/proc/{pid}/environ", "rb") as handle:
        environ = handle.read().split(b"\0")
    assert b"GREETING=hi" in environ
    assert f"WORKSPACE_ID={workspace_id}".encode() in environ

    assert api.post(f"/api/workspaces/{workspace_id}/stop/").status_code == 202
    stopped = _wait_status(api, workspace_id, WorkspaceStatus.STOPPED)
    assert stopped["is_running"] is False
    wait_for(lambda: not alive(pid, start_time), timeout=10, message="agent process gone")

    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202
    online_again = _wait_status(api, workspace_id, WorkspaceStatus.ONLINE)
    assert online_again["generation"] > first_generation
    assert online_again["is_running"] is True
    new_pid, new_start = _pid(workspace_id)
    assert (new_pid, new_start) != (pid, start_time)

    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    removed = _wait_status(api, workspace_id, WorkspaceStatus.REMOVED)
    assert removed["is_running"] is False
    wait_for(lambda: not alive(new_pid, new_start), timeout=10, message="agent process gone")
    assert not os.path.exists(on_stack.data_dir / workspace_id)

    types = [
        event["type"]
        for event in api.get(f"/api/workspaces/{workspace_id}/events/").json()["results"]
    ]
    assert types[0] == EventType.PROVISIONING
    assert types.count(EventType.ONLINE) == 2
    assert EventType.STOPPED in types
    assert types[-1] == EventType.REMOVED
    assert EventType.PROVISION_FAILED not in types


def test_missing_required_env_fails_at_once_naming_it(api) -> None:
    response = api.post(
        "/api/workspaces/",
        {"name": "needs-key", "template": "claude-code-default", "env": {"OTHER": "x"}},
    )
    assert response.status_code == 201
    failed = _wait_status(api, response.json()["id"], WorkspaceStatus.FAILED, timeout=10)
    assert "ANTHROPIC_API_KEY" in failed["last_error"]
    assert "OTHER" not in failed["last_error"]
    events = api.get(f"/api/workspaces/{failed['id']}/events/").json()["results"]
    failure = [event for event in events if event["type"] == EventType.PROVISION_FAILED]
    assert len(failure) == 1
    assert failure[0]["source"] == "preflight"
    assert failure[0]["payload"]["missing_env"] == ["ANTHROPIC_API_KEY"]
    assert Workspace.objects.get(id=failed["id"]).backend_state == {}


def test_unknown_workspace_id_task_is_harmless(celery_worker) -> None:
    """A converge for an id with no row (deleted meanwhile, or never there) succeeds doing
    nothing: no row appears, no gate stays held, and the worker is not harmed."""
    from provisioning import gate
    from provisioning.tasks import converge_workspace

    workspace_id = str(uuid.uuid4())
    sent = converge_workspace.delay(workspace_id)
    finished = wait_for(
        lambda: next(
            (
                line
                for line in celery_worker.log().splitlines()
                if f"provisioning.converge[{sent.id}]" in line
                and ("succeeded" in line or "raised" in line)
            ),
            None,
        ),
        message="the worker to finish the task",
    )
    assert "succeeded" in finished and finished.rstrip().endswith(": []"), finished
    assert not Workspace.objects.filter(id=workspace_id).exists()
    assert not gate.is_held(workspace_id)
    assert celery_worker.proc is not None and celery_worker.proc.poll() is None
