"""``WorkspaceSerializer`` builds its representation directly (every create answer and every row of
a list page): it must give exactly the JSON that DRF's generic field-by-field path gives."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from portal.api.serializers import WorkspaceSerializer
from workspaces import selectors, services
from workspaces.models import Workspace
from workspaces.status import DesiredState, WorkspaceStatus

pytestmark = pytest.mark.django_db
S = WorkspaceStatus


def _both(workspace: Workspace) -> tuple[bytes, bytes]:
    serializer = WorkspaceSerializer(workspace)
    generic = serializers.ModelSerializer.to_representation(serializer, workspace)
    return JSONRenderer().render(serializer.data), JSONRenderer().render(generic)


def test_the_direct_representation_is_the_generic_one(user: Any, settings: Any) -> None:
    settings.IDLE_TIMEOUT_SECONDS = 600  # so that online rows have an idle_stop_at
    now = timezone.now()
    created = services.create_workspace(owner=user, name="fresh", template="shell-default")
    team = services.create_team(owner=user, name="squad", template="team-default")
    online = services.create_workspace(owner=user, name="up", template="shell-default")
    Workspace.objects.filter(id=online.id).update(
        status=S.ONLINE,
        is_running=True,
        generation=2,
        last_started_at=now - timedelta(minutes=3),
        last_heartbeat_at=now,
        last_activity_at=now - timedelta(seconds=30),
        env_version=2,
        started_env_version=1,
    )
    failed = services.create_workspace(owner=user, name="down", template="shell-default")
    Workspace.objects.filter(id=failed.id).update(
        status=S.FAILED,
        desired_state=DesiredState.STOPPED,
        last_error='the agent said "no"\nand left',
    )

    as_returned = [created, team.parent, *team.members]
    for workspace in as_returned:
        built, generic = _both(workspace)
        assert built == generic, workspace.name
    read_back = [
        *selectors.list_workspaces(user),
        *selectors.visible_workspaces(user).select_related("owner"),
    ]
    assert {w.name for w in read_back} >= {"fresh", "squad", "up", "down"}
    for workspace in read_back:
        built, generic = _both(workspace)
        assert built == generic, workspace.name
    # The states above reach every optional field at least once.
    rendered = [WorkspaceSerializer(w).data for w in read_back]
    assert any(row["members"] for row in rendered)
    assert any(row["parent"] for row in rendered)
    assert any(row["idle_stop_at"] for row in rendered)
    assert any(row["pending_changes"] for row in rendered)
    assert any(row["url"] for row in rendered)
    assert any(row["last_error"] for row in rendered)


def test_a_page_of_the_list_is_the_generic_representation(user: Any, api: Any) -> None:
    for index in range(3):
        services.create_workspace(owner=user, name=f"row-{index}", template="shell-default")
    page = api.get("/api/workspaces/").json()["results"]
    by_id = {str(w.id): w for w in selectors.list_workspaces(user)}
    assert len(page) == 3
    for row in page:
        workspace = by_id[row["id"]]
        generic = serializers.ModelSerializer.to_representation(
            WorkspaceSerializer(workspace), workspace
        )
        assert JSONRenderer().render(row) == JSONRenderer().render(generic)
