"""The isolation tests: each tries to cross a workspace's boundary from inside it."""

from __future__ import annotations

from typing import Any

from tests.support import wait_for
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus


def create_online(
    api: Any, name: str, template: str, env: dict[str, str], *, timeout: float
) -> Workspace:
    """POST a workspace with ``env`` and wait until it is online (failing at once if it fails)."""
    response = api.post(
        "/api/workspaces/", {"name": name, "template": template, "env": env}, format="json"
    )
    assert response.status_code == 201, response.content
    workspace_id = response.json()["id"]

    def online() -> Workspace | None:
        workspace = Workspace.objects.get(id=workspace_id)
        assert workspace.status != WorkspaceStatus.FAILED, workspace.last_error
        return workspace if workspace.status == WorkspaceStatus.ONLINE else None

    return wait_for(online, timeout=timeout, message=f"{name} online")
