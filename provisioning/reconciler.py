"""Reconciliation: the database keeps following what the backends say (invariant 1, over time).

One pass, batched so its cost in backend calls does not grow with the number of workspaces:

1. one ``SELECT DISTINCT backend`` of the workspaces not removed (plus the default backend, so
   orphans are found even when no workspace is left on it);
2. ``list_instances()`` once per backend;
3. one ``SELECT`` of every workspace that is not removed, compared in memory with the listing
   (``assess``): most rows agree and cost nothing more;
4. for each row that disagrees: take its gate without waiting (busy means a cycle runs and will
   write the truth itself: skip it, the next pass looks again), re-read the row and ask the
   backend about that one instance (``status``), and repair through a fenced service in
   ``workspaces.services`` only if they still disagree;
5. instances labelled for a workspace that is removed or unknown (orphans): removed, under the
   gate of that id, with a log line (and an event when the workspace row still exists);
6. the proxy's one static configuration (``provisioning.routes.reconcile``: one read, a load only
   when a proxy restarted empty or holds an older one); what it serves per workspace is read
   from the rows on every request, so there is nothing per workspace to compare.

Why the listing comes before the SELECT: a workspace's row is committed before its first cycle is
enqueued, so an instance seen in the listing always has its row visible to the later SELECT; an
instance started after the listing is simply not compared this time. The confirmation under the
gate (step 4) catches the opposite case, a cycle that changed the row and the backend between the
two reads.

Policy for an instance running while the row says ``stopped`` or ``failed``: the instance is
stopped (the last word of the user, or of the platform, was not "run"); the row never follows
into a running status without its agent registering.
"""

from __future__ import annotations

import enum
import logging
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from django.conf import settings

from provisioning import gate, pools, routes
from provisioning.backends import backend_named, default_backend_name
from provisioning.backends.base import (
    BackendError,
    InstanceInfo,
    InstanceStatus,
    WorkspaceBackend,
)
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus

# Statuses a cycle owns: a stop or removal is under way or pending; the reconciler keeps out.
_IN_FLIGHT = frozenset({S.STOPPING, S.REMOVING, S.REMOVED})
_FIELDS = (
    "id",
    "backend",
    "status",
    "is_running",
    "generation",
    "requested_seq",
    "handled_seq",
)


class Drift(enum.StrEnum):
    GONE = "instance_gone"  # the row says running; the backend runs nothing
    UNWANTED = "running_while_not_wanted"  # the row says stopped/failed; the instance runs
    UNSEEN = "running_unseen"  # an offline row says not running; the instance runs
    ORPHAN = "orphan"  # an instance for a removed or unknown workspace


@dataclass(frozen=True)
class Row:
    id: UUID
    backend: str
    status: WorkspaceStatus
    is_running: bool
    generation: int
    pending: bool  # requested_seq > handled_seq: a cycle is due and will write the truth

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Row:
        return cls(
            id=values["id"],
            backend=values["backend"] or default_backend_name(),
            status=WorkspaceStatus(values["status"]),
            is_running=values["is_running"],
            generation=values["generation"],
            pending=values["requested_seq"] > values["handled_seq"],
        )


def assess(row: Row, running: bool) -> Drift | None:
    """Whether ``row`` disagrees with a backend that says the instance is ``running``."""
    if row.pending or row.status in _IN_FLIGHT:
        return None
    if running and row.status in (S.STOPPED, S.FAILED):
        return Drift.UNWANTED
    if not running and row.is_running:
        # A provisioning row with is_running set is a finished cycle waiting for its agent: the
        # instance dying now means it will never register.
        return Drift.GONE
    if running and not row.is_running and row.status == S.OFFLINE:
        return Drift.UNSEEN
    # provisioning with is_running false: the cycle has not started the instance yet (or a
    # killed worker's task is redelivered); the cycle, the redrive and the provisioning sweep
    # own it.
    return None


@dataclass(frozen=True)
class Repair:
    workspace_id: str
    backend: str
    drift: Drift
    outcome: str

    def line(self) -> str:
        return f"{self.workspace_id} [{self.backend}] {self.drift.value}: {self.outcome}"


@dataclass
class PassReport:
    workspaces: int = 0
    instances: int = 0
    disagreements: int = 0
    backend_calls: Counter[str] = field(default_factory=Counter)
    repairs: list[Repair] = field(default_factory=list)
    skipped_busy: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    proxy: routes.ProxyReport = field(default_factory=routes.ProxyReport)
    pools: list[str] = field(default_factory=list)

    @property
    def total_backend_calls(self) -> int:
        return sum(self.backend_calls.values())

    def summary(self) -> dict[str, Any]:
        return {
            "workspaces": self.workspaces,
            "instances": self.instances,
            "disagreements": self.disagreements,
            "repairs": len(self.repairs),
            "skipped_busy": len(self.skipped_busy),
            "backend_calls": dict(self.backend_calls),
            "unavailable": self.unavailable,
            "errors": len(self.errors),
            "proxy": {"restored": self.proxy.restored, "error": self.proxy.error},
        }


def _holder() -> str:
    return f"reconciler@{socket.gethostname()}"


class _Pass:
    def __init__(self, overrides: Mapping[str, WorkspaceBackend] | None) -> None:
        self.overrides = dict(overrides or {})
        self.report = PassReport()

    def backend(self, name: str) -> WorkspaceBackend:
        if name in self.overrides:
            return self.overrides[name]
        return backend_named(name)

    def call(self, backend_name: str, method: str) -> None:
        self.report.backend_calls[f"{backend_name}.{method}"] += 1

    def run(self) -> PassReport:
        live = Workspace.objects.exclude(status=S.REMOVED)
        names = set(live.values_list("backend", flat=True).distinct()) | {default_backend_name()}
        names |= set(self.overrides)
        listings: dict[str, dict[str, InstanceInfo]] = {}
        backends: dict[str, WorkspaceBackend] = {}
        for name in sorted(n or default_backend_name() for n in names):
            try:
                backend = self.backend(name)
                self.call(name, "list_instances")
                listed = backend.list_instances()
            except BackendError as exc:
                # Never conclude "everything died" from a backend we cannot see.
                self.report.unavailable[name] = str(exc)
                logger.warning("reconciler: skipping backend %s: %s", name, exc)
                continue
            backends[name] = backend
            listings[name] = {info.workspace_id: info for info in listed}
            self.report.instances += len(listed)

        known: dict[str, set[str]] = {name: set() for name in listings}
        suspects: list[tuple[Row, Drift]] = []
        for values in live.values(*_FIELDS).iterator(chunk_size=2000):
            row = Row.of(values)
            self.report.workspaces += 1
            listing = listings.get(row.backend)
            if listing is None:
                continue  # its backend is unavailable: nothing is known, nothing is repaired
            key = str(row.id)
            known[row.backend].add(key)
            info = listing.get(key)
            drift = assess(row, running=bool(info and info.running))
            if drift is not None:
                suspects.append((row, drift))

        self.report.disagreements = len(suspects)
        for row, _ in suspects:
            self._confirm_and_repair(backends[row.backend], row.id)
        for name, listing in listings.items():
            for workspace_id, info in listing.items():
                if workspace_id not in known[name]:
                    self._remove_orphan(name, backends[name], info)
        self.report.proxy = routes.reconcile()
        return self.report

    def _confirm_and_repair(self, backend: WorkspaceBackend, workspace_id: UUID) -> None:
        try:
            with gate.hold(workspace_id, _holder()) as lease:
                values = (
                    Workspace.objects.filter(id=workspace_id)
                    .values(*_FIELDS, "backend_state")
                    .first()
                )
                if values is None:
                    return
                row = Row.of(values)
                lease.set_generation(row.generation)
                self.call(row.backend, "status")
                state = dict(values["backend_state"] or {})
                status = backend.status(row.id, state)
                drift = assess(row, running=status.running)
                if drift is None:
                    return  # a cycle or the agent wrote the truth since the listing
                outcome = self._repair(backend, lease, row, state, drift, status)
                if outcome:
                    self.report.repairs.append(Repair(str(row.id), row.backend, drift, outcome))
        except (gate.GateBusy, services.LeaseLost):
            # A cycle runs now (or took the gate while our lease lapsed) and writes what the
            # backend says when it ends.
            self.report.skipped_busy.append(str(workspace_id))
        except BackendError as exc:
            self.report.errors.append(f"{workspace_id}: {exc}")
            logger.warning("reconciler: could not repair %s: %s", workspace_id, exc)

    def _repair(
        self,
        backend: WorkspaceBackend,
        lease: gate.Lease,
        row: Row,
        state: dict[str, Any],
        drift: Drift,
        status: InstanceStatus,
    ) -> str | None:
        detail = status.detail
        if drift is Drift.GONE:
            target = services.record_instance_gone(
                row.id,
                row.generation,
                exit_code=status.exit_code,
                detail=detail,
                output_tail=status.output_tail,
            )
            return f"{row.status} -> {target} (not running)" if target else None
        if drift is Drift.UNWANTED:
            # Like a cycle, touch the backend only while the gate is still ours: a holder whose
            # lease lapsed could otherwise stop the instance a newer cycle just started.
            lease.ensure()
            self.call(row.backend, "stop")
            state = backend.stop(row.id, state, settings.STOP_GRACE_SECONDS)
            if services.record_unwanted_instance_stopped(
                row.id, row.generation, backend_state=state, detail=detail
            ):
                return f"stopped the instance ({row.status} wants nothing running)"
            return None
        if drift is Drift.UNSEEN:
            if services.record_instance_found_running(row.id, row.generation, detail=detail):
                return "offline, instance running (waits for a heartbeat)"
            return None
        return None

    def _remove_orphan(self, name: str, backend: WorkspaceBackend, info: InstanceInfo) -> None:
        try:
            workspace_id = UUID(info.workspace_id)
        except ValueError:
            logger.warning(
                "reconciler: %s instance %r is labelled %r, not a workspace id; left alone",
                name,
                info.ref,
                info.workspace_id,
            )
            return
        try:
            with gate.hold(workspace_id, _holder()) as lease:
                row = Workspace.objects.filter(id=workspace_id).values("status", "backend").first()
                if row is not None and row["status"] != S.REMOVED and row["backend"] == name:
                    return  # created after the SELECT of this pass: not an orphan
                lease.ensure()
                self.call(name, "remove")
                backend.remove_orphan(info)
                if row is not None:
                    services.record_orphan_removed(workspace_id, backend=name, ref=info.ref)
        except (gate.GateBusy, services.LeaseLost):
            self.report.skipped_busy.append(str(workspace_id))
            return
        except BackendError as exc:
            self.report.errors.append(f"orphan {workspace_id}: {exc}")
            logger.warning("reconciler: could not remove orphan %s: %s", workspace_id, exc)
            return
        why = "removed workspace" if row is not None else "unknown workspace"
        logger.warning(
            "reconciler: removed orphan %s instance %s of %s %s",
            name,
            info.ref or "-",
            why,
            workspace_id,
        )
        self.report.repairs.append(
            Repair(str(workspace_id), name, Drift.ORPHAN, f"removed ({why})")
        )


def reconcile_once(backends: Mapping[str, WorkspaceBackend] | None = None) -> PassReport:
    """Run one reconciliation pass. ``backends`` replaces the registered backend of those names
    (benchmarks pass an instrumented one); every other name is asked of ``backend_named``.

    Safe to run concurrently with cycles, the sweeps and another pass: every repair takes the
    workspace's gate without waiting and writes by compare-and-set on the generation."""
    report = _Pass(backends).run()
    if backends is None:
        # The warm pools follow too: a member the pass found dead is failed now and replaced.
        report.pools = [line.line() for line in pools.sweep()]
    if report.repairs or report.errors or report.proxy.restored:
        logger.info("reconcile pass: %s", report.summary())
    return report
