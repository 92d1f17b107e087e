"""The admin and `manage.py workspace` go through the same services as the API."""

from __future__ import annotations

import uuid

import pytest
from django.core.management import CommandError, call_command

from workspaces import services
from workspaces.models import Workspace
from workspaces.status import DesiredState, WorkspaceStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, make_user):
    staff = make_user("operator", staff=True)
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    return client


@pytest.fixture
def workspace(user) -> Workspace:
    return services.create_workspace(
        owner=user, name="adm", template="shell-default", env={"SECRET_THING": "hunter2-value"}
    )


def test_admin_lists_filters_and_searches(staff_client, workspace) -> None:
    page = staff_client.get("/admin/workspaces/workspace/?status__exact=provisioning&q=adm")
    assert page.status_code == 200
    assert b"adm" in page.content
    empty = staff_client.get("/admin/workspaces/workspace/?status__exact=online")
    assert b"0 workspaces" in empty.content


def test_admin_shows_and_filters_the_sandbox(staff_client, user, templates_dir) -> None:
    boxed = services.create_workspace(owner=user, name="boxed", template="shell-gvisor")
    plain = services.create_workspace(owner=user, name="plain", template="shell-default")
    listed = staff_client.get("/admin/workspaces/workspace/?sandbox__exact=gvisor")
    assert listed.status_code == 200
    assert b"boxed" in listed.content and b"plain" not in listed.content
    assert b'<span class="ws-sandbox">gvisor</span>' in listed.content  # under the template
    for row, shown in ((boxed, b"gvisor"), (plain, b"runc")):
        page = staff_client.get(f"/admin/workspaces/workspace/{row.id}/change/")
        assert page.status_code == 200
        # Read-only: shown as text, never a form field.
        assert b'name="sandbox"' not in page.content
        assert b"Sandbox:" in page.content and b'<div class="readonly">' + shown in page.content


def test_admin_change_page_shows_events_but_never_env(staff_client, workspace) -> None:
    services.request_restart(workspace.id)
    page = staff_client.get(f"/admin/workspaces/workspace/{workspace.id}/change/")
    assert page.status_code == 200
    assert b"hunter2-value" not in page.content
    assert b"SECRET_THING" not in page.content


def test_admin_actions_call_the_services(staff_client, workspace) -> None:
    url = "/admin/workspaces/workspace/"
    response = staff_client.post(
        url, {"action": "stop_selected", "_selected_action": [str(workspace.id)]}, follow=True
    )
    assert response.status_code == 200
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    assert workspace.desired_state == DesiredState.STOPPED
    staff_client.post(url, {"action": "restart_selected", "_selected_action": [str(workspace.id)]})
    workspace.refresh_from_db()
    assert workspace.desired_state == DesiredState.RUNNING
    # Remove asks first: the first POST shows a confirmation page and changes nothing.
    asked = staff_client.post(
        url, {"action": "remove_selected", "_selected_action": [str(workspace.id)]}
    )
    assert asked.status_code == 200
    assert b"Yes, remove" in asked.content
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPING
    staff_client.post(
        url,
        {"action": "remove_selected", "_selected_action": [str(workspace.id)], "confirm": "yes"},
    )
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.REMOVING
    refused = staff_client.post(
        url, {"action": "start_selected", "_selected_action": [str(workspace.id)]}, follow=True
    )
    assert b"cannot be started" in refused.content


def test_admin_cannot_add_or_delete_rows(staff_client, workspace) -> None:
    assert staff_client.get("/admin/workspaces/workspace/add/").status_code == 403
    assert (
        staff_client.get(f"/admin/workspaces/workspace/{workspace.id}/delete/").status_code == 403
    )


def test_manage_py_workspace_restart(workspace, capsys) -> None:
    call_command("workspace", "restart", str(workspace.id))
    assert "restart requested" in capsys.readouterr().out
    workspace.refresh_from_db()
    assert workspace.requested_seq == 2


def test_manage_py_workspace_errors_are_clear(workspace) -> None:
    with pytest.raises(CommandError, match="not a workspace id"):
        call_command("workspace", "stop", "nope")
    with pytest.raises(CommandError, match="no workspace"):
        call_command("workspace", "stop", str(uuid.uuid4()))
    call_command("workspace", "remove", str(workspace.id))
    with pytest.raises(CommandError, match="removing"):
        call_command("workspace", "start", str(workspace.id))
