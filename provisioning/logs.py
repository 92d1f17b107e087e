"""A workspace's instance output, read from its backend: the faces' log views ask here."""

from __future__ import annotations

from django.conf import settings

from provisioning.backends import backend_for
from provisioning.backends.base import WorkspaceBackend
from workspaces.models import Workspace


def workspace_logs(workspace: Workspace, tail: int) -> str:
    """The last ``tail`` lines of the workspace's instance output, from its backend (bounded by
    ``LOGS_MAX_BYTES``). Raises ``BackendError`` when the backend cannot be asked."""
    backend = backend_for(workspace, check=False)
    return backend.logs(
        workspace.id, {}, min(tail, settings.LOGS_MAX_TAIL), settings.LOGS_MAX_BYTES
    )


def logs_backend(workspace: Workspace) -> WorkspaceBackend:
    """The backend to follow ``workspace``'s output on, once a one-line read showed it answers
    (``check_available`` is not that probe: it may set a backend up, e.g. a firewall). Raises
    ``BackendError`` when it cannot be asked."""
    backend = backend_for(workspace, check=False)
    backend.logs(workspace.id, {}, 1, 1024)
    return backend
