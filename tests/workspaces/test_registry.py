"""The agent's registry calls: bearer tokens bound to one workspace and one generation."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.conf import settings
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


# --- the registry listener's heartbeat and registration -------------------------------------------
def _listener_call(
    token: str | None,
    body: bytes,
    *,
    content_type: str = "application/json",
    path: str = "/api/registry/heartbeat",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST ``path`` to the registry listener's WSGI application, in process."""
    import io
    import json

    from django.core import signals
    from django.db import close_old_connections

    from project import registry_wsgi

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8001",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
        **({"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}),
    }
    answered: list[Any] = []
    # As Django's test client does: the test's connection (and its transaction) stays open.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        content = b"".join(
            registry_wsgi.application(
                environ, lambda status, headers, *_: answered.extend([status, headers])
            )
        )
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
    status, headers = answered
    return int(status.split()[0]), json.loads(content), dict(headers)


def _beat_body(workspace_id: uuid.UUID, **fields: Any) -> bytes:
    import json

    return json.dumps({"workspace_id": str(workspace_id), **fields}).encode()


def test_the_listener_records_a_common_beat_in_one_statement_and_answers_as_the_view(
    workspace,
) -> None:
    """A beat that changes nothing but the clocks is one UPDATE, which checks the token too,
    with none of Django's request machinery; its answer is the view's, byte for byte."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    _, token = _cycle(workspace)
    assert _register(token, workspace.id).status_code == 200
    view = _agent(token).post(
        "/api/registry/heartbeat", {"workspace_id": str(workspace.id)}, format="json"
    )
    Workspace.objects.filter(id=workspace.id).update(last_heartbeat_at=None)
    with CaptureQueriesContext(connection) as queries:
        status, answer, headers = _listener_call(token, _beat_body(workspace.id, active=True))
    assert (status, answer) == (200, view.json())
    assert headers["Content-Type"] == "application/json"
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["UPDATE"]
    stored = Workspace.objects.get(id=workspace.id)
    assert stored.last_heartbeat_at is not None
    assert stored.last_activity_at >= stored.last_heartbeat_at


def test_the_listener_leaves_every_other_beat_to_the_view(workspace, user) -> None:
    """A status to change, a stale, unknown or foreign token, another body: the view decides
    and answers as it always has."""
    _, token = _cycle(workspace)
    assert _register(token, workspace.id).status_code == 200
    # A status change, with its event.
    status, answer, _ = _listener_call(token, _beat_body(workspace.id, healthy=False))
    assert (status, answer["status"]) == (200, "degraded")
    assert workspace.events.filter(type=EventType.DEGRADED).count() == 1
    status, answer, _ = _listener_call(token, _beat_body(workspace.id, healthy=True))
    assert (status, answer["status"]) == (200, "online")
    # Booleans the view's serializer reads, but not as JSON booleans: the view takes them.
    status, answer, _ = _listener_call(token, _beat_body(workspace.id, healthy="true"))
    assert (status, answer["status"]) == (200, "online")
    # Another body: 400 naming the field.
    status, answer, _ = _listener_call(token, _beat_body(workspace.id, healthy="maybe"))
    assert status == 400 and "healthy" in answer["errors"]
    status, answer, _ = _listener_call(token, b'{"workspace_id": "not-a-uuid"}')
    assert status == 400 and "workspace_id" in answer["errors"]
    # Unknown token, no token, a token of another workspace, a stale token.
    assert _listener_call("x" * 43, _beat_body(workspace.id))[0] == 401
    assert _listener_call(None, _beat_body(workspace.id))[0] in (401, 403)
    other = services.create_workspace(owner=user, name="other-ws", template="shell-default")
    _, other_token = _cycle(other)
    assert _listener_call(other_token, _beat_body(workspace.id))[0] in (401, 403)
    _, newer = _cycle(Workspace.objects.get(id=workspace.id))
    status, answer, _ = _listener_call(token, _beat_body(workspace.id))
    assert (status, answer) == (401, {"detail": "unknown or revoked workspace token"})
    assert Workspace.objects.get(id=workspace.id).status == WorkspaceStatus.PROVISIONING
    # A body larger than the listener reads itself goes to the view, and meets the API's limits.
    status, answer, _ = _listener_call(newer, _beat_body(workspace.id, pad="x" * 2048))
    assert (status, answer["status"]) == (200, "provisioning")
    limit = settings.API_MAX_BODY_BYTES
    assert _listener_call(newer, _beat_body(workspace.id, pad="x" * limit))[0] == 413


def test_the_listener_never_revives_a_removed_workspace(workspace) -> None:
    _, token = _cycle(workspace)
    assert _register(token, workspace.id).status_code == 200
    Workspace.objects.filter(id=workspace.id).update(
        status=WorkspaceStatus.REMOVED, is_running=False
    )
    assert _listener_call(token, _beat_body(workspace.id))[0] == 401
    assert Workspace.objects.get(id=workspace.id).status == WorkspaceStatus.REMOVED


REGISTER = "/api/registry/register"


def test_the_listener_registers_without_the_request_machinery_as_the_view_does(user) -> None:
    """A well-formed registration is the view's own ``register_agent`` with none of Django's
    middleware or DRF: the token's read, the row's lock, one UPDATE and the event; its answer
    and what it writes are the view's."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    by_view = services.create_workspace(owner=user, name="by-view", template="shell-default")
    _, view_token = _cycle(by_view)
    view = _register(view_token, by_view.id)
    here = services.create_workspace(owner=user, name="by-listener", template="shell-default")
    _, token = _cycle(here)
    with CaptureQueriesContext(connection) as queries:
        status, answer, headers = _listener_call(token, _beat_body(here.id), path=REGISTER)
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert answer == {**view.json(), "workspace_id": str(here.id)}
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert statements.count("SELECT") == 2 and statements.count("UPDATE") == 1, statements
    assert statements.count("INSERT") == 1, statements  # the ONLINE event
    for workspace in (by_view, here):
        stored = Workspace.objects.get(id=workspace.id)
        assert (stored.status, stored.is_running) == (WorkspaceStatus.ONLINE, True)
        assert stored.last_heartbeat_at is not None and stored.last_started_at is not None
        assert stored.events.filter(type=EventType.ONLINE).count() == 1
    # A retried registration changes nothing and answers the same.
    assert _listener_call(token, _beat_body(here.id), path=REGISTER)[1] == answer
    assert here.events.filter(type=EventType.ONLINE).count() == 1


def test_the_listener_leaves_every_refused_registration_to_the_view(workspace, user) -> None:
    """What ``register_agent`` refuses, or a body the listener does not read itself, is the
    view's to answer, as it always has; nothing is written on the way."""
    _, token = _cycle(workspace)
    # Unknown, foreign and stale tokens.
    assert _listener_call("x" * 43, _beat_body(workspace.id), path=REGISTER)[0] == 401
    other = services.create_workspace(owner=user, name="other-ws", template="shell-default")
    _, other_token = _cycle(other)
    assert _listener_call(other_token, _beat_body(workspace.id), path=REGISTER)[0] in (401, 403)
    _, newer = _cycle(Workspace.objects.get(id=workspace.id))
    status, answer, _ = _listener_call(token, _beat_body(workspace.id), path=REGISTER)
    assert (status, answer) == (401, {"detail": "unknown or revoked workspace token"})
    # Bodies the view refuses, naming the field.
    status, answer, _ = _listener_call(
        newer, _beat_body(workspace.id, config_copied="maybe"), path=REGISTER
    )
    assert status == 400 and "config_copied" in answer["errors"]
    status, answer, _ = _listener_call(newer, b'{"workspace_id": "x"}', path=REGISTER)
    assert status == 400 and "workspace_id" in answer["errors"]
    assert workspace.events.filter(type=EventType.ONLINE).count() == 0
    # A workspace that is stopping refuses it (409), a removed one is never revived.
    Workspace.objects.filter(id=workspace.id).update(status=WorkspaceStatus.STOPPING)
    assert _listener_call(newer, _beat_body(workspace.id), path=REGISTER)[0] == 409
    Workspace.objects.filter(id=workspace.id).update(
        status=WorkspaceStatus.REMOVED, is_running=False
    )
    assert _listener_call(newer, _beat_body(workspace.id), path=REGISTER)[0] == 401
    assert Workspace.objects.get(id=workspace.id).status == WorkspaceStatus.REMOVED
    assert workspace.events.filter(type=EventType.ONLINE).count() == 0
    # A string the view's serializer reads as a boolean goes to the view, which registers.
    status, answer, _ = _listener_call(
        other_token, _beat_body(other.id, config_copied="true"), path=REGISTER
    )
    assert (status, answer["status"]) == (200, "online")
    assert other.events.filter(type=EventType.ONLINE).count() == 1
