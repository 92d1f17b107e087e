"""The API's observability additions: owner in the shape, filters, ordering, logs, actors."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import client_for
from workspaces import services
from workspaces.status import WorkspaceStatus

pytestmark = pytest.mark.django_db


def _names(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [item["name"] for item in response.json()["results"]]


@pytest.fixture
def fleet(user, other_user):
    services.create_workspace(owner=user, name="b-shell", template="shell-default")
    services.create_workspace(
        owner=user, name="a-claude", template="claude-code-default", env={"ANTHROPIC_API_KEY": "k"}
    )
    services.create_workspace(owner=other_user, name="c-hermes", template="hermes-default")
    gone = services.create_workspace(owner=user, name="z-gone", template="shell-default")
    services.request_remove(gone.id)
    services.transition(gone.id, WorkspaceStatus.REMOVED)


def test_staff_see_the_owner_and_filter_by_it(fleet, make_user) -> None:
    staff = client_for(make_user("operator", staff=True))
    everyone = staff.get("/api/workspaces/?ordering=name").json()["results"]
    assert [(item["name"], item["owner"]) for item in everyone] == [
        ("a-claude", "alice"),
        ("b-shell", "alice"),
        ("c-hermes", "mallory"),
    ]
    assert _names(staff.get("/api/workspaces/?owner=mallory")) == ["c-hermes"]
    assert _names(staff.get("/api/workspaces/?owner=nobody")) == []


def test_filters_are_exact_and_combine(api, fleet) -> None:
    assert _names(api.get("/api/workspaces/?template=shell-default")) == ["b-shell"]
    assert _names(api.get("/api/workspaces/?runtime=claude-code")) == ["a-claude"]
    assert _names(api.get("/api/workspaces/?name=a-claude&backend=process")) == ["a-claude"]
    assert _names(api.get("/api/workspaces/?backend=docker")) == []
    # Another owner's workspaces stay invisible whatever the filter says.
    assert _names(api.get("/api/workspaces/?owner=mallory")) == []
    assert _names(api.get("/api/workspaces/?name=c-hermes")) == []


def test_removed_only_with_status_removed(api, fleet) -> None:
    assert "z-gone" not in _names(api.get("/api/workspaces/?name=z-gone"))
    assert _names(api.get("/api/workspaces/?status=removed&name=z-gone")) == ["z-gone"]


def test_ordering(api, fleet) -> None:
    assert _names(api.get("/api/workspaces/?ordering=name")) == ["a-claude", "b-shell"]
    assert _names(api.get("/api/workspaces/?ordering=-name")) == ["b-shell", "a-claude"]
    assert _names(api.get("/api/workspaces/")) == ["a-claude", "b-shell"]  # newest first
    bad = api.get("/api/workspaces/?ordering=env")
    assert bad.status_code == 400
    assert "ordering" in bad.json()["detail"]


def test_logs_come_from_the_backend_and_are_owner_scoped(api, user, other_user) -> None:
    workspace = services.create_workspace(owner=user, name="talky", template="shell-default")
    folder = Path(settings.WORKSPACE_DATA_DIR) / str(workspace.id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "agent.log").write_text("".join(f"line {n}\n" for n in range(500)))

    body = api.get(f"/api/workspaces/{workspace.id}/logs/?tail=3").json()
    assert body["lines"] == ["line 497", "line 498", "line 499"]
    assert body["name"] == "talky"
    assert body["owner"] == "alice"
    assert body["tail"] == 3
    default = api.get(f"/api/workspaces/{workspace.id}/logs/").json()
    assert len(default["lines"]) == settings.LOGS_DEFAULT_TAIL
    too_many = api.get(f"/api/workspaces/{workspace.id}/logs/?tail={settings.LOGS_MAX_TAIL + 1}")
    assert too_many.status_code == 400
    assert "tail" in too_many.json()["detail"]
    assert api.get(f"/api/workspaces/{workspace.id}/logs/?tail=x").status_code == 400
    assert client_for(other_user).get(f"/api/workspaces/{workspace.id}/logs/").status_code == 404
    assert api.get(f"/api/workspaces/{uuid.uuid4()}/logs/").status_code == 404


def test_logs_of_an_unreachable_backend_are_a_json_503(api, user, settings) -> None:
    workspace = services.create_workspace(
        owner=user, name="far", template="shell-default", backend="docker"
    )
    from provisioning.backends import reset_backends

    settings.DOCKER_HOST = "unix:///nonexistent/docker.sock"
    reset_backends()
    try:
        response = api.get(f"/api/workspaces/{workspace.id}/logs/")
    finally:
        reset_backends()
    assert response.status_code == 503
    assert "docker" in response.json()["detail"]


def test_every_request_records_who_asked(api, user, make_user) -> None:
    created = api.post(
        "/api/workspaces/", {"name": "who", "template": "shell-default"}, format="json"
    ).json()
    workspace_id = created["id"]
    from workspaces.models import Workspace

    assert Workspace.objects.get(id=workspace_id).requested_by == "user:alice"
    staff = make_user("operator", staff=True)
    client_for(staff).post(f"/api/workspaces/{workspace_id}/stop/")
    assert Workspace.objects.get(id=workspace_id).requested_by == "user:operator"
