"""The dashboard's pages, through Django's test client (the browser test is test_browser.py)."""

from __future__ import annotations

import pytest

from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, WorkspaceStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def test_dashboard_needs_a_login_and_uses_djangos_login_page(client, user) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    assert b'name="password"' in page.content
    logged = client.post("/accounts/login/", {"username": "alice", "password": "x-password-123"})
    assert logged.status_code == 302
    assert client.get("/").status_code == 200


def test_dashboard_lists_only_the_users_workspaces(logged_in, user, other_user) -> None:
    mine = services.create_workspace(owner=user, name="mine", template="shell-default")
    services.create_workspace(owner=other_user, name="theirs", template="shell-default")
    page = logged_in.get("/")
    assert b"mine" in page.content
    assert b"theirs" not in page.content
    assert f'data-workspace="{mine.id}"'.encode() in page.content
    # The static files the page names are served (whitenoise).
    assert logged_in.get("/static/workspaces/dashboard.js").status_code == 200


def test_create_form_creates_with_env_and_the_user_as_actor(logged_in, user) -> None:
    response = logged_in.post(
        "/", {"name": "from-form", "template": "shell-default", "env": "GREETING=hello\n\nX=1=2"}
    )
    workspace = Workspace.objects.get(name="from-form")
    assert response.status_code == 302
    assert response["Location"] == f"/w/{workspace.id}/"
    assert workspace.env.reveal() == {"GREETING": "hello", "X": "1=2"}
    assert workspace.owner == user
    assert workspace.requested_by == "user:alice"


def test_create_form_errors_name_the_field_and_never_echo_env(logged_in) -> None:
    response = logged_in.post(
        "/", {"name": "Bad Name", "template": "shell-default", "env": "SECRET=hunter2-value"}
    )
    assert response.status_code == 200
    assert b"lowercase letters" in response.content
    assert b"hunter2-value" not in response.content
    bad_env = logged_in.post("/", {"name": "ok", "template": "shell-default", "env": "no-equals"})
    assert b"expected KEY=value" in bad_env.content
    reserved = logged_in.post(
        "/", {"name": "ok", "template": "shell-default", "env": "WORKSPACE_TOKEN=x"}
    )
    assert b"WORKSPACE_TOKEN is reserved" in reserved.content
    assert not Workspace.objects.exists()


def test_team_template_from_the_form_creates_the_team(logged_in) -> None:
    response = logged_in.post("/", {"name": "crew", "template": "team-default", "env": ""})
    parent = Workspace.objects.get(name="crew")
    assert response["Location"] == f"/w/{parent.id}/"
    assert parent.members.count() >= 1
    assert b"Team members" in logged_in.get(f"/w/{parent.id}/").content


def test_buttons_request_through_the_services(logged_in, user) -> None:
    workspace = services.create_workspace(owner=user, name="btn", template="shell-default")
    response = logged_in.post(f"/w/{workspace.id}/stop/", {"next": f"/w/{workspace.id}/"})
    assert response.status_code == 302
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    assert workspace.requested_by == "user:alice"
    assert response["Location"] == f"/w/{workspace.id}/"
    elsewhere = logged_in.post(f"/w/{workspace.id}/start/", {"next": "https://evil.example/"})
    assert elsewhere["Location"] == "/"  # never an open redirect
    assert logged_in.get(f"/w/{workspace.id}/stop/").status_code == 405  # POST only
    assert logged_in.post(f"/w/{workspace.id}/explode/").status_code == 404


def test_delete_asks_for_confirmation_first(logged_in, user) -> None:
    workspace = services.create_workspace(owner=user, name="gone", template="shell-default")
    page = logged_in.get(f"/w/{workspace.id}/remove/")
    assert b"Yes, delete gone" in page.content
    workspace.refresh_from_db()
    assert workspace.desired_state == DesiredState.RUNNING
    logged_in.post(f"/w/{workspace.id}/remove/")
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.REMOVING


def test_workspace_page_shows_events_with_their_actor_and_is_owner_scoped(
    client, logged_in, user, other_user
) -> None:
    workspace = services.create_workspace(owner=user, name="page", template="shell-default")
    services.request_restart(workspace.id, actor="user:alice")
    from workspaces.status import EventSource, EventType

    services.record_event(workspace.id, EventType.PROVISIONING, EventSource.LIFECYCLE, 1)
    assert WorkspaceEvent.objects.get().actor == "user:alice"
    page = logged_in.get(f"/w/{workspace.id}/")
    assert page.status_code == 200
    assert b"PROVISIONING" in page.content
    assert b"user:alice" in page.content
    assert f"/api/workspaces/{workspace.id}/logs/".encode() in page.content
    client.force_login(other_user)
    assert client.get(f"/w/{workspace.id}/").status_code == 404
    assert client.post(f"/w/{workspace.id}/stop/").status_code == 404
    assert client.get(f"/w/{workspace.id}/remove/").status_code == 404
