"""The agent's registry calls: bearer tokens bound to one workspace and one generation."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from rest_framework.test import APIClient

from workspaces import services
from workspaces.models import AgentToken, Workspace
from workspaces.status import EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db


def _agent(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def _cycle(workspace: Workspace) -> tuple[int, str]:
    """Begin a cycle the way the lifecycle does and issue its token."""
    cycle = services.begin_cycle(workspace.id, WorkspaceStatus.PROVISIONING, action="provision")
    assert cycle is not None
    return cycle.generation, services.issue_agent_token(workspace.id, cycle.generation)


@pytest.fixture
def workspace(user) -> Workspace:
    return services.create_workspace(owner=user, name="agent-ws", template="shell-default")


def _register(token: str, workspace_id: uuid.UUID) -> Any:
    return _agent(token).post(
        "/api/registry/register", {"workspace_id": str(workspace_id)}, format="json"
    )


def test_register_moves_provisioning_to_online_with_is_running(workspace) -> None:
    generation, token = _cycle(workspace)
    response = _register(token, workspace.id)
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "online"
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.ONLINE
    assert workspace.is_running is True
    assert workspace.last_started_at is not None
    assert workspace.events.filter(type=EventType.ONLINE, generation=generation).count() == 1
    # Registering again is idempotent: no second event.
    assert _register(token, workspace.id).status_code == 200
    assert workspace.events.filter(type=EventType.ONLINE).count() == 1


def test_tokens_are_stored_hashed(workspace) -> None:
    _, token = _cycle(workspace)
    stored = AgentToken.objects.get(workspace=workspace)
    assert stored.token_hash != token
    assert token not in stored.token_hash
    assert len(stored.token_hash) == 64


def test_token_of_another_workspace_is_refused(workspace, user) -> None:
    other = services.create_workspace(owner=user, name="other", template="shell-default")
    _, token = _cycle(workspace)
    response = _register(token, other.id)
    assert response.status_code == 401
    other.refresh_from_db()
    assert other.status == WorkspaceStatus.PROVISIONING


def test_token_of_an_older_generation_is_refused(workspace) -> None:
    _, old_token = _cycle(workspace)
    _, new_token = _cycle(workspace)
    response = _register(old_token, workspace.id)
    assert response.status_code == 401
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.PROVISIONING
    assert _register(new_token, workspace.id).status_code == 200


def test_unknown_or_missing_token_is_401(workspace) -> None:
    assert _register("nope", workspace.id).status_code == 401
    response = APIClient().post(
        "/api/registry/register", {"workspace_id": str(workspace.id)}, format="json"
    )
    assert response.status_code == 401


def test_user_token_cannot_register(workspace, api) -> None:
    """A user's API token is not an agent token: the registry does not accept it."""
    response = api.post(
        "/api/registry/register", {"workspace_id": str(workspace.id)}, format="json"
    )
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"


def test_bad_body_is_400_naming_the_field(workspace) -> None:
    _, token = _cycle(workspace)
    response = _agent(token).post("/api/registry/register", {"workspace_id": "x"}, format="json")
    assert response.status_code == 400
    assert "workspace_id" in response.json()["errors"]


def test_a_removed_workspace_is_never_revived(workspace) -> None:
    _, token = _cycle(workspace)
    services.request_remove(workspace.id)
    cycle = services.begin_cycle(workspace.id, WorkspaceStatus.REMOVING, action="remove")
    assert cycle is not None
    assert services.complete_remove(workspace.id, cycle.generation)
    assert _register(token, workspace.id).status_code == 401
    heartbeat = _agent(token).post(
        "/api/registry/heartbeat", {"workspace_id": str(workspace.id)}, format="json"
    )
    assert heartbeat.status_code == 401
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.REMOVED
    assert workspace.is_running is False
    assert workspace.env.reveal() == {}


def test_registration_while_stopping_is_refused(workspace) -> None:
    _, token = _cycle(workspace)
    services.request_stop(workspace.id)
    response = _register(token, workspace.id)
    assert response.status_code == 409
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING


def test_heartbeat_records_time_and_health(workspace) -> None:
    _, token = _cycle(workspace)
    assert _register(token, workspace.id).status_code == 200
    agent = _agent(token)
    body = {"workspace_id": str(workspace.id), "healthy": False}
    assert agent.post("/api/registry/heartbeat", body, format="json").json()["status"] == "degraded"
    body["healthy"] = True
    assert agent.post("/api/registry/heartbeat", body, format="json").json()["status"] == "online"
    workspace.refresh_from_db()
    assert workspace.last_heartbeat_at is not None


def _register_copied(token: str, workspace_id: uuid.UUID) -> Any:
    body = {"workspace_id": str(workspace_id), "config_copied": True}
    return _agent(token).post("/api/registry/register", body, format="json")


def test_a_config_copy_after_an_earlier_registration_is_a_recovery(workspace) -> None:
    """The agent says the engine filled its config volume from the template (the volume was
    empty). On the first registration that is the first population; after one, a recovery,
    recorded once, from the template the cycle resolves (``<runtime>-default`` when the
    workspace's own is gone)."""
    _, token = _cycle(workspace)
    assert _register_copied(token, workspace.id).status_code == 200
    assert not workspace.events.filter(type=EventType.CONFIG_RECOVERED).exists()

    generation, token = _cycle(workspace)
    assert _register_copied(token, workspace.id).status_code == 200
    assert _register_copied(token, workspace.id).status_code == 200  # a retry: nothing more
    [recovered] = workspace.events.filter(type=EventType.CONFIG_RECOVERED)
    assert (recovered.generation, recovered.source) == (generation, "agent")
    assert recovered.payload == {"template": "shell-default", "fallback": False}

    # The workspace's template is gone: the runtime's default is the source.
    Workspace.objects.filter(id=workspace.id).update(template="gone-template")
    generation, token = _cycle(workspace)
    assert _register_copied(token, workspace.id).status_code == 200
    latest = workspace.events.filter(type=EventType.CONFIG_RECOVERED).latest("id")
    assert latest.generation == generation
    assert latest.payload == {"template": f"{workspace.runtime}-default", "fallback": True}

    # Without the flag, nothing is recorded.
    _, token = _cycle(workspace)
    assert _register(token, workspace.id).status_code == 200
    assert workspace.events.filter(type=EventType.CONFIG_RECOVERED).count() == 2


def test_a_cycle_begins_with_the_row_as_written_and_one_read_of_it(user: Any) -> None:
    """``begin_cycle`` locks the row once and keeps it: the cycle's row is what the UPDATE
    wrote (no read back), and its event takes that row (no second read of the workspace)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    workspace = services.create_workspace(owner=user, name="begins", template="shell-default")
    with CaptureQueriesContext(connection) as queries:
        cycle = services.begin_cycle(workspace.id, WorkspaceStatus.PROVISIONING, action="provision")
    assert cycle is not None
    reads = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert len(reads) == 1 and "FOR UPDATE" in reads[0], reads
    stored = Workspace.objects.get(id=workspace.id)
    for name in (
        "status",
        "generation",
        "provisioning_started_at",
        "last_error",
        "started_env_version",
        "last_activity_at",
        "requested_seq",
    ):
        assert getattr(cycle.workspace, name) == getattr(stored, name), name
    assert cycle.generation == stored.generation == 1
    event = stored.events.get(type=EventType.PROVISIONING)
    assert event.actor == "user:alice"
