"""The operators' admin and command line, and the actor every request records."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.admin.models import LogEntry
from django.core.management import CommandError, call_command

from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(make_user):
    staff = make_user("operator", staff=True)
    staff.is_superuser = True
    staff.save()
    return staff


@pytest.fixture
def staff_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def workspace(user) -> Workspace:
    return services.create_workspace(owner=user, name="ops", template="shell-default")


# --- admin ---------------------------------------------------------------------------------------
def test_changelist_colours_status_and_shows_error_and_time_in_state(
    staff_client, workspace
) -> None:
    services.fail_cycle(
        workspace.id, 0, source=EventSource.BACKEND, message="FATAL: could not load model weights"
    )
    page = staff_client.get("/admin/workspaces/workspace/").content.decode()
    assert 'class="ws-status" style="background:#b91c1c' in page  # failed is red
    assert "FATAL: could not load model weights" in page
    assert "in state" in page.lower()
    workspace.refresh_from_db()
    assert workspace.status_changed_at is not None


def test_owner_and_team_filters(staff_client, user, other_user) -> None:
    team = services.create_team(owner=user, name="crew", template="team-default")
    services.create_workspace(owner=other_user, name="solo", template="shell-default")

    def listed(query: str) -> set[str]:
        response = staff_client.get(f"/admin/workspaces/workspace/?{query}")
        assert response.status_code == 200
        return {workspace.name for workspace in response.context["cl"].result_list}

    assert listed(f"owner__id__exact={other_user.id}") == {"solo"}
    assert listed(f"team={team.parent.id}") == {"crew", *(m.name for m in team.members)}
    # The parent's page lists its members.
    parent_page = staff_client.get(f"/admin/workspaces/workspace/{team.parent.id}/change/")
    assert b"team members" in parent_page.content.lower()
    assert team.members[0].name.encode() in parent_page.content


def test_timestamps_have_seconds(staff_client, workspace) -> None:
    page = staff_client.get(f"/admin/workspaces/workspace/{workspace.id}/change/").content
    stamp = workspace.created_at.strftime("%Y-%m-%d %H:%M:%S")
    assert stamp.encode() in page


def test_detail_page_has_lifecycle_buttons_and_no_save(staff_client, workspace) -> None:
    url = f"/admin/workspaces/workspace/{workspace.id}/change/"
    page = staff_client.get(url).content.decode()
    assert 'name="_save"' not in page
    assert 'name="_continue"' not in page
    for verb in ("start", "stop", "restart"):
        assert f"/lifecycle/{verb}/" in page
    assert "Remove…" in page
    assert "last lines of output" in page.lower()
    # A POST to the change view saves nothing: there is nothing to save.
    assert staff_client.post(url, {}).status_code == 405


def test_detail_buttons_go_through_the_services_with_the_admin_as_actor(
    staff_client, workspace
) -> None:
    base = f"/admin/workspaces/workspace/{workspace.id}/lifecycle"
    response = staff_client.post(f"{base}/stop/")
    assert response.status_code == 302
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    assert workspace.requested_by == "admin:operator"
    entry = LogEntry.objects.get()
    assert entry.object_id == str(workspace.id)
    assert entry.get_change_message() == "Requested stop"
    # Remove: GET shows the confirmation page and changes nothing; POST with confirm removes.
    confirm = staff_client.get(f"{base}/remove/")
    assert b"Yes, remove" in confirm.content
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    staff_client.post(f"{base}/remove/")  # without confirm: back to the question
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    staff_client.post(f"{base}/remove/", {"confirm": "yes"})
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.REMOVING
    assert LogEntry.objects.count() == 2
    # Refused requests say why and log nothing.
    refused = staff_client.post(f"{base}/start/", follow=True)
    assert b"cannot be started" in refused.content
    assert LogEntry.objects.count() == 2


def test_bulk_actions_write_the_admin_log(staff_client, workspace) -> None:
    staff_client.post(
        "/admin/workspaces/workspace/",
        {"action": "restart_selected", "_selected_action": [str(workspace.id)]},
    )
    assert LogEntry.objects.get().get_change_message() == "Requested restart"
    workspace.refresh_from_db()
    assert workspace.requested_by == "admin:operator"


def test_events_have_their_own_filtered_list(staff_client, workspace, user) -> None:
    services.record_event(workspace.id, EventType.PROVISIONING, EventSource.LIFECYCLE, 1)
    services.record_event(workspace.id, EventType.ONLINE, EventSource.AGENT, 1)

    def listed(query: str) -> list[tuple[str, str]]:
        response = staff_client.get(f"/admin/workspaces/workspaceevent/?{query}")
        assert response.status_code == 200
        return [(event.type, event.actor) for event in response.context["cl"].result_list]

    assert listed("source__exact=agent") == [("WORKSPACE_ONLINE", "agent")]
    assert listed("type__exact=WORKSPACE_PROVISIONING") == [
        ("WORKSPACE_PROVISIONING", "user:alice")
    ]
    assert len(listed(f"q={workspace.name}")) == 2
    page = staff_client.get("/admin/workspaces/workspaceevent/").content
    assert b"user:alice" in page and b"ops" in page
    assert staff_client.get("/admin/workspaces/workspaceevent/add/").status_code == 403


# --- actor ---------------------------------------------------------------------------------------
def test_actor_by_source_and_by_request(workspace) -> None:
    services.request_restart(workspace.id, actor="manage.py:root")
    cycle = services.record_event(workspace.id, EventType.PROVISIONING, EventSource.LIFECYCLE, 1)
    assert cycle.actor == "manage.py:root"
    assert (
        services.record_event(workspace.id, EventType.ONLINE, EventSource.AGENT, 1).actor == "agent"
    )
    swept = services.record_event(
        workspace.id, EventType.PROVISION_FAILED, EventSource.PROVISION_TIMEOUT_SWEEP, 1
    )
    assert swept.actor == "beat"
    repaired = services.record_event(workspace.id, EventType.OFFLINE, EventSource.RECONCILER, 1)
    assert repaired.actor == "reconciler"


# --- manage.py workspace ------------------------------------------------------------------------
def test_cli_takes_owner_slash_name_or_id(workspace, capsys) -> None:
    call_command("workspace", "status", "alice/ops")
    out = capsys.readouterr().out
    assert f"alice/ops ({workspace.id})" in out
    call_command("workspace", "status", str(workspace.id), "--json")
    assert json.loads(capsys.readouterr().out)["owner"] == "alice"
    with pytest.raises(CommandError, match="no workspace named 'alice/nope'"):
        call_command("workspace", "status", "alice/nope")
    with pytest.raises(CommandError, match="no workspace"):
        call_command("workspace", "status", str(uuid.uuid4()))


def test_cli_list_names_owner_and_filters(workspace, other_user, capsys) -> None:
    services.create_workspace(owner=other_user, name="theirs", template="shell-default")
    call_command("workspace", "list")
    out = capsys.readouterr().out
    assert "alice/ops" in out
    assert "mallory/theirs" in out
    call_command("workspace", "list", "--owner", "mallory", "--json")
    assert [item["name"] for item in json.loads(capsys.readouterr().out)] == ["theirs"]


def test_cli_requests_record_manage_py_as_actor(workspace, capsys) -> None:
    call_command("workspace", "stop", "alice/ops")
    assert f"stop requested for alice/ops ({workspace.id})" in capsys.readouterr().out
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    assert workspace.requested_by.startswith("manage.py")


def test_cli_create_and_events_and_logs(user, capsys) -> None:
    call_command(
        "workspace", "create", "alice/made", "--template", "shell-default", "--env", "A=b", "--json"
    )
    created = json.loads(capsys.readouterr().out)
    workspace = Workspace.objects.get(id=created["id"])
    assert workspace.env.reveal() == {"A": "b"}
    assert workspace.requested_by.startswith("manage.py")
    services.record_event(workspace.id, EventType.PROVISIONING, EventSource.LIFECYCLE, 1)
    call_command("workspace", "events", "alice/made")
    out = capsys.readouterr().out
    assert "events of alice/made" in out
    assert "WORKSPACE_PROVISIONING" in out and "manage.py" in out
    call_command("workspace", "events", "alice/made", "--json")
    assert json.loads(capsys.readouterr().out)[0]["actor"].startswith("manage.py")
    call_command("workspace", "logs", "alice/made", "--tail", "5")
    assert f"logs of alice/made ({workspace.id})" in capsys.readouterr().err
    with pytest.raises(CommandError, match="env"):
        call_command("workspace", "create", "alice/bad-env", "--env", "WORKSPACE_TOKEN=x")
    with pytest.raises(CommandError, match="no user"):
        call_command("workspace", "create", "nobody/x")
    assert WorkspaceEvent.objects.filter(workspace__name="bad-env").count() == 0
