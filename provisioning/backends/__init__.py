"""The one backend selector. No other module constructs a backend (a test enforces it)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.conf import settings
from django.utils.module_loading import import_string

from provisioning.backends.base import BackendUnavailable, SandboxUnavailable, WorkspaceBackend
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


def backend_for(
    workspace: Workspace, *, check: bool = True, launch: bool = False
) -> WorkspaceBackend:
    """The backend that runs ``workspace``: the only way any code path gets one.

    Raises ``BackendUnavailable`` naming the backend and the reason when it is unknown, not
    configured or not reachable, so the caller fails the workspace at once instead of waiting.
    ``launch``: the caller is about to start an instance, so the backend must also be able to
    run the workspace's sandbox (``SandboxUnavailable`` naming it otherwise: a start never falls
    back to another runtime). Stopping, removing or reading a workspace needs no such check: a
    gVisor workspace stays stoppable on an engine that lost the runtime.
    """
    name = workspace.backend or default_backend_name()
    if not launch:
        return backend_named(name, check=check)
    backend = backend_named(name, check=False)
    # A backend that has no such sandbox at all says so before anything is asked of its engine.
    if workspace.sandbox not in backend.sandboxes:
        raise SandboxUnavailable(
            backend.name,
            workspace.sandbox,
            f"the {backend.name} backend runs {' or '.join(backend.sandboxes)} workspaces only "
            "(gvisor needs the docker backend)",
        )
    if check:
        backend.check_available()
    backend.check_sandbox(workspace.sandbox)
    return backend


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
