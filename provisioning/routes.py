"""Workspace routes: what the proxy should serve for each workspace, and keeping it so.

A workspace has a route while its row says its app is up: status ``online``, ``degraded`` or
``offline`` (the agent went quiet but the instance was last seen running), ``is_running``, and an
``app_port``. Every route write happens under the workspace's gate, after ``lease.ensure()``,
like a cycle's backend call, so a holder whose lease lapsed never writes a route over a newer
cycle's decision:

* a start, stop, remove or failed cycle deletes the route (the row leaves the routable statuses);
* the agent's registration (and a heartbeat that brings an offline row back) enqueues
  ``provisioning.sync_route``, which takes the gate and writes what the row says now;
* the reconciler compares the proxy's routes with the database in one pass (``reconcile``).

The proxy itself cannot compare-and-set on a generation; the gate orders the writers and the
reconciler repairs whatever a crash between a row change and its route write left behind.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from django.conf import settings

from provisioning import gate, proxy
from provisioning.backends import backend_named
from provisioning.backends.base import BackendError, WorkspaceBackend
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import RUNNING_STATUSES, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus
ROUTABLE_STATUSES = RUNNING_STATUSES | {S.OFFLINE}
_LABEL_RE = re.compile(r"[^a-z0-9-]+")


def owner_label(username: str) -> str:
    """The owner's part of a workspace host name: a DNS label from the username."""
    return _LABEL_RE.sub("-", username.lower()).strip("-")[:63] or "user"


def workspace_host(name: str, username: str) -> str:
    return f"{name}--{owner_label(username)}.{settings.WORKSPACE_DOMAIN}"


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
    """The workspace's URL through the proxy, or None while it has no route."""
    if not is_routable(workspace):
        return None
    return host_url(workspace_host(workspace.name, workspace.owner.username)) + "/"


def desired_route(workspace: Workspace, backend: WorkspaceBackend) -> dict[str, Any]:
    assert workspace.app_port is not None
    upstream = backend.app_address(workspace.id, dict(workspace.backend_state), workspace.app_port)
    return proxy.route_for(
        workspace.id,
        workspace_host(workspace.name, workspace.owner.username),
        upstream,
        workspace.generation,
    )


def _load(workspace_id: UUID) -> Workspace | None:
    return Workspace.objects.select_related("owner").filter(id=workspace_id).first()


def sync(workspace_id: UUID, lease: gate.Lease) -> str:
    """Under the workspace's gate: make the proxy serve what the row says now. Returns what was
    done: ``put``, ``deleted`` or ``absent``. Raises ``proxy.ProxyError``."""
    workspace = _load(workspace_id)
    if workspace is not None:
        lease.set_generation(workspace.generation)
    if workspace is not None and is_routable(workspace):
        route = desired_route(workspace, backend_named(workspace.backend, check=False))
        lease.ensure()
        proxy.put_route(route)
        return "put"
    lease.ensure()
    return "deleted" if proxy.delete_route(workspace_id) else "absent"


def remove(workspace_id: UUID, lease: gate.Lease) -> None:
    """A cycle took the workspace out of the routable statuses: delete its route. A proxy that
    cannot be reached fails nothing; the reconciler deletes the route later."""
    try:
        lease.ensure()
        proxy.delete_route(workspace_id)
    except proxy.ProxyError as exc:
        logger.warning("route of %s not deleted now (the reconciler will): %s", workspace_id, exc)


@dataclass
class RoutesReport:
    routes: int = 0
    wanted: int = 0
    server_restored: bool = False
    repaired: list[str] = field(default_factory=list)
    skipped_busy: list[str] = field(default_factory=list)
    error: str = ""


def reconcile(holder: str) -> RoutesReport:
    """One pass: the proxy's routes (one listing) against the database (one SELECT). A missing
    or different route is written, a route the database does not want is deleted, each under
    the workspace's gate (busy: a cycle runs and writes the route itself; the next pass looks
    again). A proxy restarted empty gets its server and every route back in this one pass."""
    report = RoutesReport()
    try:
        report.server_restored, actual = proxy.ensure_server_and_list()
    except proxy.ProxyError as exc:
        report.error = str(exc)
        logger.warning("reconciler: proxy unavailable: %s", exc)
        return report
    report.routes = len(actual)
    wanted: dict[str, dict[str, Any]] = {}
    backends: dict[str, WorkspaceBackend | None] = {}
    rows = (
        Workspace.objects.select_related("owner")
        .filter(status__in=sorted(ROUTABLE_STATUSES), is_running=True, app_port__isnull=False)
        .iterator(chunk_size=2000)
    )
    for workspace in rows:
        if workspace.backend not in backends:
            try:
                backends[workspace.backend] = backend_named(workspace.backend, check=False)
            except BackendError:
                backends[workspace.backend] = None
        backend = backends[workspace.backend]
        if backend is not None:
            wanted[proxy.route_id(workspace.id)] = desired_route(workspace, backend)
    report.wanted = len(wanted)
    stale = [rid for rid, route in wanted.items() if actual.get(rid) != route]
    stale += [rid for rid in actual if rid not in wanted]
    for rid in stale:
        try:
            workspace_id = UUID(rid.removeprefix(proxy.ROUTE_PREFIX))
        except ValueError:
            continue  # not a route of ours
        try:
            with gate.hold(workspace_id, holder) as lease:
                done = sync(workspace_id, lease)
        except (gate.GateBusy, services.LeaseLost):
            report.skipped_busy.append(str(workspace_id))
            continue
        except proxy.ProxyError as exc:
            report.error = str(exc)
            logger.warning("reconciler: route of %s not repaired: %s", workspace_id, exc)
            continue
        report.repaired.append(f"{workspace_id}: {done}")
    if report.repaired:
        logger.info("reconciler: routes repaired: %s", report.repaired)
    return report
