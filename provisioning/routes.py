"""What the proxy serves for each workspace, read from the database on every request.

The proxy has one route for every workspace host (``provisioning.proxy``); on each request it
asks the platform, which finds the workspace by its host (``workspaces.access``) and answers
with the workspace's upstream when the row says its app is up (``upstream``): status
``online``, ``degraded`` or ``offline`` (the agent went quiet but the instance was last seen
running), ``is_running``, and an ``app_port``. So what the proxy serves follows the row exactly,
the moment it changes, from every writer (a cycle, the agent, the reconciler): there is no
route per workspace to write, delete or keep in step, and nothing to order under the gate.

What remains to keep in step is the proxy's one static configuration: a proxy started or
restarted empty (or with an older configuration) gets it back from the reconciler
(``reconcile``: one read of the proxy's configuration, a load only when it differs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings

from provisioning import proxy
from provisioning.backends import backend_named
from workspaces.access import workspace_host
from workspaces.models import Workspace
from workspaces.status import RUNNING_STATUSES, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus
ROUTABLE_STATUSES = RUNNING_STATUSES | {S.OFFLINE}


def public_port() -> int:
    if settings.WORKSPACE_PUBLIC_PORT:
        return int(settings.WORKSPACE_PUBLIC_PORT)
    return int(str(settings.PROXY_BIND).rsplit(":", 1)[1])


def host_url(host: str) -> str:
    scheme = settings.WORKSPACE_URL_SCHEME
    port = public_port()
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


def is_routable(workspace: Workspace) -> bool:
    return (
        workspace.app_port is not None
        and workspace.is_running
        and workspace.status in ROUTABLE_STATUSES
    )


def workspace_url(workspace: Workspace) -> str | None:
    """The workspace's URL through the proxy, or None while the proxy does not serve it."""
    if not is_routable(workspace):
        return None
    return host_url(workspace_host(workspace)) + "/"


def upstream(workspace: Workspace) -> str | None:
    """``host:port`` where the proxy reaches the workspace's app now, or None while the proxy
    must not serve it. Reads the row only (``app_address`` makes no backend call)."""
    if not is_routable(workspace):
        return None
    assert workspace.app_port is not None
    backend = backend_named(workspace.backend, check=False)
    return backend.app_address(workspace.id, dict(workspace.backend_state), workspace.app_port)


@dataclass
class ProxyReport:
    restored: bool = False  # the proxy's configuration was missing or different, and was loaded
    error: str = ""


def reconcile() -> ProxyReport:
    """One pass: the proxy serves ``proxy.base_config`` (one read; a load only when it differs).
    A proxy that cannot be reached fails nothing: the next pass looks again."""
    report = ProxyReport()
    try:
        report.restored = proxy.ensure_config()
    except proxy.ProxyError as exc:
        report.error = str(exc)
        logger.warning("reconciler: proxy unavailable: %s", exc)
        return report
    if report.restored:
        logger.info("reconciler: the proxy's configuration was loaded")
    return report
