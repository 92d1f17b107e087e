"""An agent token is one per workspace and cycle: a new cycle's replaces every older one, and a
token issued again in the same cycle replaces that cycle's own. Other workspaces' tokens are
never touched."""

from __future__ import annotations

from typing import Any

import pytest

from workspaces import services
from workspaces.models import AgentToken
from workspaces.status import WorkspaceStatus

pytestmark = pytest.mark.django_db


def _begin(workspace_id: Any) -> services.CycleStart:
    cycle = services.begin_cycle(workspace_id, WorkspaceStatus.PROVISIONING, action="provision")
    assert cycle is not None
    return cycle


def test_one_token_per_workspace_and_cycle(user: Any) -> None:
    workspace = services.create_workspace(owner=user, name="tokened", template="shell-default")
    other = services.create_workspace(owner=user, name="bystander", template="shell-default")
    bystander = _begin(other.id)

    first = _begin(workspace.id)
    again = services.issue_agent_token(workspace.id, first.generation)  # same cycle, new token
    assert services.authenticate_agent(first.token) is None
    held = services.authenticate_agent(again)
    assert held is not None and held.generation == first.generation
    assert AgentToken.objects.filter(workspace_id=workspace.id).count() == 1

    second = _begin(workspace.id)
    assert second.generation == first.generation + 1
    assert services.authenticate_agent(again) is None
    newest = services.authenticate_agent(second.token)
    assert newest is not None and newest.generation == second.generation
    assert list(
        AgentToken.objects.filter(workspace_id=workspace.id).values_list("generation", flat=True)
    ) == [second.generation]

    kept = services.authenticate_agent(bystander.token)
    assert kept is not None and kept.workspace_id == other.id
