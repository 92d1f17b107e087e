"""The REST API contract: auth, ownership, validation, transitions, shapes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.conftest import client_for
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, WorkspaceStatus

pytestmark = pytest.mark.django_db

FIELDS = {
    "id",
    "name",
    "template",
    "runtime",
    "backend",
    "sandbox",
    "status",
    "desired_state",
    "is_running",
    "last_started_at",
    "last_heartbeat_at",
    "last_activity_at",
    "idle_stop_at",
    "pending_changes",
    "members",
    "last_error",
    "provision_timeout_ms",
    "url",
    "generation",
    "created_at",
    "updated_at",
    "parent",
    "owner",
}


def _create(
    api: APIClient, name: str = "dev", template: str = "shell-default", **extra: Any
) -> Any:
    return api.post(
        "/api/workspaces/", {"name": name, "template": template, **extra}, format="json"
    )


def test_create_returns_201_in_provisioning_with_the_full_shape(api) -> None:
    response = _create(api, env={"TOKEN_FOR_SERVICE": "s3cret-value"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == FIELDS
    assert body["status"] == WorkspaceStatus.PROVISIONING
    assert body["url"] is None  # no route until the app answers
    assert body["runtime"] == "shell"
    assert body["backend"] == "process"
    assert body["sandbox"] == "runc"  # the default: the template names none
    assert body["is_running"] is False
    assert body["provision_timeout_ms"] == 600_000
    assert "s3cret-value" not in response.content.decode()
    workspace = Workspace.objects.get(id=body["id"])
    assert workspace.env.reveal() == {"TOKEN_FOR_SERVICE": "s3cret-value"}


def test_create_answers_without_reading_what_it_just_wrote(api) -> None:
    """The answer's owner is the caller and a new workspace has no team members: after the
    INSERT, the create reads nothing back."""
    with CaptureQueriesContext(connection) as queries:
        response = _create(api)
    assert response.status_code == 201, response.content
    assert response.json()["members"] == []
    statements = [query["sql"] for query in queries.captured_queries]
    inserted = next(i for i, sql in enumerate(statements) if sql.startswith("INSERT"))
    after = [sql.split()[0] for sql in statements[inserted + 1 :]]
    assert set(after) <= {"RELEASE", "SAVEPOINT"}, statements[inserted:]


def test_create_enqueues_only_after_commit(api, django_capture_on_commit_callbacks) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert _create(api).status_code == 201
    assert len(callbacks) == 1


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "dev", "template": "no-such-template"}, "template"),
        ({"name": "dev"}, "template"),
        ({"template": "shell-default"}, "name"),
        ({"name": "Bad Name!", "template": "shell-default"}, "name"),
        ({"name": "-dash", "template": "shell-default"}, "name"),
        ({"name": "x" * 64, "template": "shell-default"}, "name"),
        ({"name": "dev", "template": "shell-default", "env": {"A": 1}}, "env"),
        ({"name": "dev", "template": "shell-default", "env": {"A": True}}, "env"),
        ({"name": "dev", "template": "shell-default", "env": {"A": None}}, "env"),
        ({"name": "dev", "template": "shell-default", "env": ["A=1"]}, "env"),
        ({"name": "dev", "template": "shell-default", "env": "A=1"}, "env"),
        ({"name": "dev", "template": "shell-default", "env": {"1BAD": "x"}}, "env"),
        ({"name": "dev", "template": "shell-default", "env": {"WORKSPACE_TOKEN": "x"}}, "env"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(api, payload, field) -> None:
    response = api.post("/api/workspaces/", payload, format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body["errors"], body
    assert field in body["detail"]
    assert not Workspace.objects.exists()


def test_malformed_json_is_a_400(api) -> None:
    response = api.post("/api/workspaces/", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert "detail" in response.json()


def test_duplicate_name_is_a_400_naming_name(api) -> None:
    assert _create(api).status_code == 201
    response = _create(api)
    assert response.status_code == 400
    assert "name" in response.json()["errors"]
    assert Workspace.objects.count() == 1


def test_the_same_name_is_free_for_another_owner_and_after_removal(api, other_user) -> None:
    first = _create(api).json()
    assert _create(client_for(other_user)).status_code == 201
    Workspace.objects.filter(id=first["id"]).update(status=WorkspaceStatus.REMOVED)
    assert _create(api).status_code == 201


def test_anonymous_calls_are_401() -> None:
    anonymous = APIClient()
    some_id = uuid.uuid4()
    for method, path in [
        ("get", "/api/workspaces/"),
        ("post", "/api/workspaces/"),
        ("get", f"/api/workspaces/{some_id}/"),
        ("delete", f"/api/workspaces/{some_id}/"),
        ("post", f"/api/workspaces/{some_id}/start/"),
        ("get", "/api/templates/"),
    ]:
        response = getattr(anonymous, method)(path)
        assert response.status_code == 401, (method, path)
        assert "detail" in response.json()


def test_bad_token_is_401() -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert client.get("/api/workspaces/").status_code == 401


def test_another_owners_workspace_is_a_404_for_every_verb(api, other_user) -> None:
    theirs = _create(client_for(other_user)).json()["id"]
    calls = [
        ("get", f"/api/workspaces/{theirs}/"),
        ("delete", f"/api/workspaces/{theirs}/"),
        ("post", f"/api/workspaces/{theirs}/start/"),
        ("post", f"/api/workspaces/{theirs}/stop/"),
        ("post", f"/api/workspaces/{theirs}/restart/"),
        ("get", f"/api/workspaces/{theirs}/events/"),
    ]
    for method, path in calls:
        response = getattr(api, method)(path)
        assert response.status_code == 404, (method, path, response.content)
    assert Workspace.objects.get(id=theirs).status == WorkspaceStatus.PROVISIONING
    assert theirs not in {row["id"] for row in api.get("/api/workspaces/").json()["results"]}


def test_staff_see_every_workspace(user, make_user) -> None:
    mine = _create(client_for(user)).json()["id"]
    staff = client_for(make_user("root", staff=True))
    assert staff.get(f"/api/workspaces/{mine}/").status_code == 200
    assert staff.get("/api/workspaces/").json()["count"] == 1


def test_list_is_paginated_and_filters_by_status(api) -> None:
    for index in range(7):
        _create(api, name=f"ws-{index}")
    Workspace.objects.filter(name="ws-3").update(status=WorkspaceStatus.STOPPED)
    page = api.get("/api/workspaces/?page_size=5").json()
    assert page["count"] == 7
    assert len(page["results"]) == 5
    assert page["next"]
    assert all(set(row) == FIELDS for row in page["results"])
    stopped = api.get("/api/workspaces/?status=stopped").json()
    assert [row["name"] for row in stopped["results"]] == ["ws-3"]
    bad = api.get("/api/workspaces/?status=starting")
    assert bad.status_code == 400
    assert "status" in bad.json()["errors"]


def test_removed_workspaces_are_listed_only_when_asked(api) -> None:
    workspace = _create(api).json()
    Workspace.objects.filter(id=workspace["id"]).update(status=WorkspaceStatus.REMOVED)
    assert api.get("/api/workspaces/").json()["count"] == 0
    assert api.get("/api/workspaces/?status=removed").json()["count"] == 1
    assert api.get(f"/api/workspaces/{workspace['id']}/").json()["status"] == "removed"


def test_start_of_a_running_workspace_is_a_409_with_the_reason(api) -> None:
    workspace = _create(api).json()
    response = api.post(f"/api/workspaces/{workspace['id']}/start/")
    assert response.status_code == 409
    assert "already provisioning" in response.json()["detail"]


def test_stop_restart_delete_are_accepted_while_provisioning(api) -> None:
    workspace_id = _create(api).json()["id"]
    stop = api.post(f"/api/workspaces/{workspace_id}/stop/")
    assert stop.status_code == 202
    assert stop.json()["status"] == WorkspaceStatus.STOPPING
    restart = api.post(f"/api/workspaces/{workspace_id}/restart/")
    assert restart.status_code == 202
    assert restart.json()["desired_state"] == DesiredState.RUNNING
    start_while_stopping = api.post(f"/api/workspaces/{workspace_id}/start/")
    assert start_while_stopping.status_code == 202
    delete = api.delete(f"/api/workspaces/{workspace_id}/")
    assert delete.status_code == 202
    assert delete.json()["status"] == WorkspaceStatus.REMOVING
    # Nothing revives a workspace being removed.
    for verb in ("start", "restart"):
        response = api.post(f"/api/workspaces/{workspace_id}/{verb}/")
        assert response.status_code == 409, verb
        assert "removing" in response.json()["detail"]
    # Stop is accepted in every status but removed: here the removal itself stops it.
    stop_while_removing = api.post(f"/api/workspaces/{workspace_id}/stop/")
    assert stop_while_removing.status_code == 202
    assert stop_while_removing.json()["status"] == WorkspaceStatus.REMOVING
    assert stop_while_removing.json()["desired_state"] == DesiredState.REMOVED
    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202


def test_stop_and_restart_are_accepted_when_failed(api) -> None:
    workspace_id = _create(api).json()["id"]
    Workspace.objects.filter(id=workspace_id).update(status=WorkspaceStatus.FAILED)
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    assert api.post(f"/api/workspaces/{workspace_id}/stop/").status_code == 202
    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202


def test_requests_record_intent_and_count(api) -> None:
    workspace_id = _create(api).json()["id"]
    for _ in range(5):
        api.post(f"/api/workspaces/{workspace_id}/restart/")
    workspace = Workspace.objects.get(id=workspace_id)
    assert workspace.requested_seq == 6
    assert workspace.handled_seq == 0
    assert workspace.generation == 0  # only a cycle, under the gate, bumps the generation


def test_events_are_oldest_first_and_filter_after(api) -> None:
    workspace_id = uuid.UUID(_create(api).json()["id"])
    from workspaces.status import EventSource, EventType

    ids = [
        services.record_event(workspace_id, EventType.PROVISIONING, EventSource.LIFECYCLE, 1).id,
        services.record_event(workspace_id, EventType.ONLINE, EventSource.AGENT, 1).id,
        services.record_event(workspace_id, EventType.STOPPED, EventSource.LIFECYCLE, 2).id,
    ]
    events = api.get(f"/api/workspaces/{workspace_id}/events/").json()["results"]
    assert [event["id"] for event in events] == ids
    assert set(events[0]) == {
        "id",
        "type",
        "source",
        "actor",
        "generation",
        "payload",
        "created_at",
    }
    assert [event["actor"] for event in events] == ["user:alice", "agent", "user:alice"]
    after = api.get(f"/api/workspaces/{workspace_id}/events/?after={ids[0]}").json()["results"]
    assert [event["id"] for event in after] == ids[1:]
    assert api.get(f"/api/workspaces/{workspace_id}/events/?after=x").status_code == 400
    assert WorkspaceEvent.objects.count() == 3


def test_templates_list_names_runtime_timeout_and_required_env(api) -> None:
    templates = {item["name"]: item for item in api.get("/api/templates/").json()}
    assert templates["shell-default"]["provision_timeout_seconds"] == 600
    assert templates["claude-code-default"]["required_env"] == ["ANTHROPIC_API_KEY"]
    assert templates["claude-code-default"]["provision_timeout_seconds"] == 900
    assert templates["hermes-default"]["provision_timeout_seconds"] == 1800
    assert templates["hermes-default"]["runtime"] == "hermes"
    assert templates["shell-default"]["sandbox"] == "runc"


def test_templates_and_workspaces_say_which_sandbox(api, templates_dir) -> None:
    templates = {item["name"]: item for item in api.get("/api/templates/").json()}
    assert templates["shell-gvisor"]["sandbox"] == "gvisor"
    created = _create(api, "boxed", template="shell-gvisor").json()
    assert created["sandbox"] == "gvisor"
    assert api.get(f"/api/workspaces/{created['id']}/").json()["sandbox"] == "gvisor"
    listed = api.get("/api/workspaces/").json()["results"]
    assert [row["sandbox"] for row in listed] == ["gvisor"]


def test_unknown_routes_and_bad_ids_are_json_404(api) -> None:
    assert api.get("/api/workspaces/not-a-uuid/").status_code == 404
    response = api.get(f"/api/workspaces/{uuid.uuid4()}/")
    assert response.status_code == 404
    assert response.json()["detail"]


def test_health_schema_and_docs(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    # No worker or beat runs here: ready only with both (tests/project/test_readiness.py).
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["redis"] == "ok"
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    assert "/api/workspaces/{id}/restart/" in schema.json()["paths"]
    assert client.get("/api/docs/").status_code == 200


def test_readyz_is_503_when_redis_is_unreachable(client, settings) -> None:
    from workspaces import redis_client

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    try:
        response = client.get("/readyz")
    finally:
        redis_client._client.cache_clear()
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("error")
