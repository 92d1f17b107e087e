"""The one backend selector. No other module constructs a backend (a test enforces it)."""

from __future__ import annotations

import functools

from django.conf import settings

from provisioning.backends.base import BackendUnavailable, WorkspaceBackend
from workspaces.models import Workspace


def default_backend_name() -> str:
    """The backend new workspaces are recorded on (``WORKSPACE_BACKEND``)."""
    return str(settings.WORKSPACE_BACKEND)


@functools.cache
def _construct(name: str) -> WorkspaceBackend:
    if name == "process":
        from provisioning.backends.process import ProcessBackend

        return ProcessBackend()
    if name == "docker":
        from provisioning.backends.docker import DockerBackend

        return DockerBackend()
    raise BackendUnavailable(
        name, f"unknown backend (known: {', '.join(settings.WORKSPACE_BACKENDS)})"
    )


def backend_for(workspace: Workspace, *, check: bool = True) -> WorkspaceBackend:
    """The backend that runs ``workspace``: the only way any code path gets one.

    Raises ``BackendUnavailable`` naming the backend and the reason when it is unknown, not
    configured or not reachable, so the caller fails the workspace at once instead of waiting.
    """
    name = workspace.backend or default_backend_name()
    if name not in settings.WORKSPACE_BACKENDS:
        raise BackendUnavailable(
            name, f"unknown backend (known: {', '.join(settings.WORKSPACE_BACKENDS)})"
        )
    try:
        backend = _construct(name)
    except BackendUnavailable:
        raise
    except Exception as exc:  # construction talks to the engine: any failure means unreachable
        raise BackendUnavailable(name, str(exc) or exc.__class__.__name__) from exc
    if check:
        backend.check_available()
    return backend


def reset_backends() -> None:
    """Forget constructed backends (settings changed, e.g. DOCKER_HOST in tests)."""
    _construct.cache_clear()
