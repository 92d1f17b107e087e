"""PATCH /api/workspaces/{id}/ (name, env) and removing a team with its parent, in-process with
the FakeBackend; the end-to-end versions with a real worker are in tests/test_policies_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

from provisioning import lifecycle
from tests.conftest import client_for
from tests.fakes import fake_backend
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db
S = WorkspaceStatus
KEY = "ANTHROPIC_API_KEY"


def _workspace(user: Any, name: str = "dev", template: str = "shell-default", **env: str) -> Any:
    return services.create_workspace(
        owner=user, name=name, template=template, env=env, backend="fake"
    )


def _raw_env(workspace_id: Any) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT env::text FROM workspaces_workspace WHERE id = %s", [workspace_id])
        return str(cursor.fetchone()[0])


def test_patch_env_is_write_only_pending_until_the_next_start(api, user) -> None:
    workspace = _workspace(user, OLD_VAR="old-secret-1f2e")
    with fake_backend() as fake:
        lifecycle.converge(workspace.id)
        assert fake.env[str(workspace.id)]["OLD_VAR"] == "old-secret-1f2e"
        response = api.patch(
            f"/api/workspaces/{workspace.id}/",
            {"env": {"NEW_VAR": "new-secret-9a8b"}},
            format="json",
        )
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["pending_changes"] == ["env"]
        assert "env" not in body and "new-secret-9a8b" not in response.content.decode()
        # The whole map is replaced: the old value is gone from the row at once.
        assert Workspace.objects.get(id=workspace.id).env.reveal() == {"NEW_VAR": "new-secret-9a8b"}
        assert "old-secret-1f2e" not in _raw_env(workspace.id)
        # Still pending while the instance that runs was launched with the old env.
        assert api.get(f"/api/workspaces/{workspace.id}/").json()["pending_changes"] == ["env"]
        assert api.post(f"/api/workspaces/{workspace.id}/restart/").status_code == 202
        assert lifecycle.converge(workspace.id) == ["restart"]
        assert fake.env[str(workspace.id)]["NEW_VAR"] == "new-secret-9a8b"
        assert "OLD_VAR" not in fake.env[str(workspace.id)]
    assert api.get(f"/api/workspaces/{workspace.id}/").json()["pending_changes"] == []
    events = str(list(WorkspaceEvent.objects.filter(workspace_id=workspace.id).values()))
    assert "secret" not in events


def test_a_preflight_failure_is_fixed_by_patch_and_restart(api, user) -> None:
    workspace = _workspace(user, template="claude-code-default")
    with fake_backend() as fake:
        lifecycle.converge(workspace.id)
        workspace.refresh_from_db()
        assert workspace.status == S.FAILED and KEY in workspace.last_error
        response = api.patch(
            f"/api/workspaces/{workspace.id}/", {"env": {KEY: "sk-fixed"}}, format="json"
        )
        assert response.status_code == 200 and response.json()["pending_changes"] == ["env"]
        api.post(f"/api/workspaces/{workspace.id}/restart/")
        assert lifecycle.converge(workspace.id) == ["start"]
        assert fake.env[str(workspace.id)][KEY] == "sk-fixed"
    workspace.refresh_from_db()
    assert workspace.status == S.PROVISIONING and workspace.last_error == ""
    assert Workspace.objects.filter(owner=user).count() == 1  # the same workspace, not a new one


def test_patch_name_applies_at_once_and_stays_unique_per_owner(api, user, other_user) -> None:
    first = _workspace(user, "first")
    _workspace(user, "taken")
    _workspace(other_user, "theirs")
    response = api.patch(f"/api/workspaces/{first.id}/", {"name": "renamed"}, format="json")
    assert response.status_code == 200
    assert (response.json()["name"], response.json()["pending_changes"]) == ("renamed", [])
    clash = api.patch(f"/api/workspaces/{first.id}/", {"name": "taken"}, format="json")
    assert clash.status_code == 400 and "name" in clash.json()["errors"], clash.content
    # Another owner's name is free for this one.
    renamed = api.patch(f"/api/workspaces/{first.id}/", {"name": "theirs"}, format="json")
    assert renamed.status_code == 200, renamed.content


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        ({"name": "Bad Name"}, {"name"}),
        ({"env": {"A": 1}}, {"env"}),
        ({"env": ["A"]}, {"env"}),
        ({"env": {"WORKSPACE_TOKEN": "x"}}, {"env"}),
        ({"env": None}, {"env"}),
        ({"status": "online"}, {"status"}),
        ({"name": "fine", "template": "claude-code-default"}, {"template"}),
        ({"name": "fine", "colour": "red", "generation": 9}, {"colour", "generation"}),
    ],
)
def test_bad_patches_are_400_naming_every_field_and_change_nothing(
    api, user, payload, fields
) -> None:
    workspace = _workspace(user, "keep", KEEP="me")
    response = api.patch(f"/api/workspaces/{workspace.id}/", payload, format="json")
    assert response.status_code == 400, response.content
    assert set(response.json()["errors"]) == fields
    workspace.refresh_from_db()
    assert (workspace.name, workspace.env.reveal(), workspace.env_version) == (
        "keep",
        {"KEEP": "me"},
        0,
    )


def test_patch_is_refused_once_removal_began_and_hidden_from_others(api, user, other_user) -> None:
    workspace = _workspace(user)
    other = client_for(other_user)
    assert other.patch(f"/api/workspaces/{workspace.id}/", {"name": "x"}).status_code == 404
    services.request_remove(workspace.id)
    response = api.patch(f"/api/workspaces/{workspace.id}/", {"name": "x"}, format="json")
    assert response.status_code == 409 and "removing" in response.json()["detail"]
    assert api.put(f"/api/workspaces/{workspace.id}/", {"name": "x"}).status_code == 405


# --- teams -----------------------------------------------------------------------------------
def _team(user: Any) -> services.Team:
    return services.create_team(
        owner=user, name="squad", template="team-default", env={KEY: "sk-x"}, backend="fake"
    )


def test_the_parent_lists_its_members_in_the_api(api, user) -> None:
    team = _team(user)
    body = api.get(f"/api/workspaces/{team.parent.id}/").json()
    assert sorted(member["id"] for member in body["members"]) == sorted(
        str(member.id) for member in team.members
    )
    assert {member["status"] for member in body["members"]} == {S.PROVISIONING}
    listed = api.get("/api/workspaces/?page_size=50").json()["results"]
    by_id = {row["id"]: row for row in listed}
    assert len(by_id[str(team.parent.id)]["members"]) == len(team.members)
    assert by_id[str(team.members[0].id)]["members"] == []


def test_the_admin_lists_the_members_on_the_parent(client, make_user, user) -> None:
    staff = make_user("operator", staff=True)
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    team = _team(user)
    page = client.get(f"/admin/workspaces/workspace/{team.parent.id}/change/").content.decode()
    assert "team members" in page.lower()
    for member in team.members:
        assert member.name in page
    assert "sk-x" not in page


def test_deleting_the_parent_removes_every_member_each_through_its_own_cycle(
    api, user, django_capture_on_commit_callbacks
) -> None:
    team = _team(user)
    lone = _workspace(user, "not-in-the-team")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.delete(f"/api/workspaces/{team.parent.id}/")
    assert response.status_code == 202
    assert response.json()["status"] == S.REMOVING
    # One converge task per workspace: the parent's and each member's own.
    assert len(callbacks) == 1 + len(team.members)
    rows = Workspace.objects.filter(id__in=[team.parent.id, *(m.id for m in team.members)])
    for row in rows:
        assert (row.status, row.desired_state, row.has_pending_intent) == (
            S.REMOVING,
            DesiredState.REMOVED,
            True,
        )
    with fake_backend():
        for row in rows:
            assert lifecycle.converge(row.id) == ["remove"]
    assert set(rows.values_list("status", flat=True)) == {S.REMOVED}
    removed = WorkspaceEvent.objects.filter(type=EventType.REMOVED, source=EventSource.LIFECYCLE)
    assert removed.count() == 1 + len(team.members)
    lone.refresh_from_db()
    assert lone.status == S.PROVISIONING  # a workspace outside the team is untouched
    body = api.get(f"/api/workspaces/{team.parent.id}/").json()
    assert {member["status"] for member in body["members"]} == {S.REMOVED}


def test_deleting_a_member_removes_only_that_member(api, user) -> None:
    team = _team(user)
    assert api.delete(f"/api/workspaces/{team.members[0].id}/").status_code == 202
    statuses = dict(Workspace.objects.values_list("id", "status"))
    assert statuses.pop(team.members[0].id) == S.REMOVING
    assert set(statuses.values()) == {S.PROVISIONING}
