"""The one backend selector. No other module constructs a backend (a test enforces it)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.conf import settings
from django.utils.module_loading import import_string

from provisioning.backends.base import BackendUnavailable, WorkspaceBackend
from workspaces.models import Workspace


def _process() -> WorkspaceBackend:
    from provisioning.backends.process import ProcessBackend

    return ProcessBackend()


def _docker() -> WorkspaceBackend:
    from provisioning.backends.docker import DockerBackend

    return DockerBackend()


def _swarm() -> WorkspaceBackend:
    from provisioning.backends.swarm import SwarmBackend

    return SwarmBackend()


# name -> factory. Tests may register a fake backend here (it must implement the contract).
FACTORIES: dict[str, Callable[[], WorkspaceBackend]] = {
    "process": _process,
    "docker": _docker,
    "swarm": _swarm,
}


def preload_modules() -> None:
    """Import the built-in backends' modules without constructing a backend: a worker's main
    process does it before forking (provisioning.worker), so its children share the loaded engine
    SDK instead of each importing it in its first cycle."""
    import provisioning.backends.docker
    import provisioning.backends.process
    import provisioning.backends.swarm  # noqa: F401


def default_backend_name() -> str:
    """The backend new workspaces are recorded on (``WORKSPACE_BACKEND``)."""
    return str(settings.WORKSPACE_BACKEND)


@functools.cache
def _construct(name: str) -> WorkspaceBackend:
    factory = FACTORIES.get(name)
    if factory is None and name in settings.EXTRA_BACKEND_FACTORIES:
        factory = import_string(settings.EXTRA_BACKEND_FACTORIES[name])
    if factory is None:
        raise BackendUnavailable(name, f"unknown backend (known: {', '.join(sorted(FACTORIES))})")
    return factory()


def backend_for(workspace: Workspace, *, check: bool = True) -> WorkspaceBackend:
    """The backend that runs ``workspace``: the only way any code path gets one.

    Raises ``BackendUnavailable`` naming the backend and the reason when it is unknown, not
    configured or not reachable, so the caller fails the workspace at once instead of waiting.
    """
    return backend_named(workspace.backend or default_backend_name(), check=check)


def backend_named(name: str, *, check: bool = True) -> WorkspaceBackend:
    """The backend registered as ``name`` (the reconciler asks per backend, not per workspace).
    Raises ``BackendUnavailable`` like ``backend_for``."""
    try:
        backend = _construct(name)
    except BackendUnavailable:
        raise
    except Exception as exc:  # construction may talk to an engine: any failure is "unreachable"
        raise BackendUnavailable(name, str(exc) or exc.__class__.__name__) from exc
    if check:
        backend.check_available()
    return backend


def reset_backends() -> None:
    """Forget constructed backends (settings changed, e.g. DOCKER_HOST in tests)."""
    _construct.cache_clear()
