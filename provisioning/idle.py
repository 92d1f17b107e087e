"""The idle auto-stop sweep: stop workspaces nobody used for longer than their idle timeout.

Run by Celery beat every ``IDLE_SWEEP_INTERVAL_SECONDS`` (task ``provisioning.sweep_idle``) and by
``python manage.py sweep_idle``. The same small steps as the stuck-provisioning sweep:

1. **Scan** rows that can be running (``online``, ``degraded``, ``offline``) whose
   ``last_activity_at`` is older than the shortest idle timeout any template has, oldest first,
   in keyset batches, from the partial index ``ws_idle_candidates``. With every timeout 0 (the
   default) nothing is read at all.
2. **Judge** each row with the one accessor (``idle_deadline``, which the API's ``idle_stop_at``
   also uses): ``last_activity_at + max(idle timeout, ACTIVITY_WRITE_INTERVAL_SECONDS)``. A row
   whose template manifest is malformed is skipped and reported, never stopped on a guess.
3. **Flip** each idle row by compare-and-set (``services.request_idle_stop``): status,
   generation and ``last_activity_at`` must still be what the scan read, still meant to run with
   no request pending. The flip records the same intent as a person's stop and enqueues a
   converge, so the stop runs under the workspace's gate like any other.

Why ``max(timeout, interval)``: ``services.record_activity`` writes at most once per interval. If
a call was skipped at time ``a`` after the scan, a write happened less than one interval before
``a``; either after the scan (the compare-and-set sees a new ``last_activity_at``) or before it
(then the row was idle for less than one interval when scanned, so it was not judged idle).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection
from django.db.models import F, QuerySet
from django.utils import timezone

from workspaces import services
from workspaces.manifests import TemplateSet, templates
from workspaces.models import Workspace
from workspaces.status import IDLE_STOPPABLE_STATUSES, DesiredState, WorkspaceStatus
from workspaces.timeouts import idle_timeout_seconds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A row as the scan read it (never its env)."""

    id: UUID
    name: str
    template: str
    runtime: str
    status: WorkspaceStatus
    generation: int
    last_activity_at: datetime


@dataclass(frozen=True)
class Idle:
    row: Candidate
    timeout_secs: int
    deadline: datetime


@dataclass
class IdleReport:
    scanned: int = 0
    stopped: list[UUID] = field(default_factory=list)
    # Idle when scanned, but the compare-and-set matched nothing: used, restarted or stopped since.
    left_alone: list[UUID] = field(default_factory=list)
    skipped: list[tuple[UUID, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "stopped": [str(item) for item in self.stopped],
            "left_alone": [str(item) for item in self.left_alone],
            "skipped": [{"id": str(item), "reason": reason} for item, reason in self.skipped],
        }


BetweenScanAndStop = Callable[[Sequence[Idle]], None]


def effective_timeout(timeout: int) -> int:
    """0 stays 0 (never); anything else is at least one activity write interval."""
    return max(timeout, int(settings.ACTIVITY_WRITE_INTERVAL_SECONDS)) if timeout > 0 else 0


def idle_deadline(
    *,
    status: str,
    desired_state: str,
    template: str,
    runtime: str,
    last_activity_at: datetime | None,
    template_set: TemplateSet | None = None,
) -> tuple[int, datetime | None]:
    """(idle timeout in seconds, when the sweep will stop the workspace): the one accessor the
    API and the sweep share. The time is None when the policy does not apply (timeout 0, not
    running, not meant to run, or a malformed manifest)."""
    template_set = template_set or templates()
    timeout = effective_timeout(idle_timeout_seconds(template, runtime, template_set=template_set))
    if (
        not timeout
        or last_activity_at is None
        or status not in IDLE_STOPPABLE_STATUSES
        or desired_state != DesiredState.RUNNING
        or template_set.errors_for(template)
    ):
        return timeout, None
    return timeout, last_activity_at + timedelta(seconds=timeout)


def idle_stop_at(workspace: Workspace) -> datetime | None:
    """When the idle sweep will stop this workspace, or None (``idle_deadline`` of its row):
    what the API, the admin and ``manage.py workspace`` show."""
    return idle_deadline(
        status=workspace.status,
        desired_state=workspace.desired_state,
        template=workspace.template,
        runtime=workspace.runtime,
        last_activity_at=workspace.last_activity_at,
    )[1]


def shortest_timeout(template_set: TemplateSet) -> int:
    """The smallest positive effective idle timeout any row can have; 0 when none is set."""
    values = [
        effective_timeout(idle_timeout_seconds(name, None, template_set=template_set))
        for name in template_set.templates
    ]
    values.append(effective_timeout(int(settings.IDLE_TIMEOUT_SECONDS)))
    positive = [value for value in values if value > 0]
    return min(positive) if positive else 0


def idle_candidates_query(
    cutoff: datetime, after: tuple[datetime, UUID] | None = None
) -> QuerySet[Any]:
    """The scan's query, served by the partial index ``ws_idle_candidates``:
    ``WHERE status IN ('degraded', 'offline', 'online') AND last_activity_at <= %s`` ordered by
    ``(last_activity_at, id)`` after the keyset ``after``."""
    rows = Workspace.objects.filter(
        status__in=sorted(IDLE_STOPPABLE_STATUSES),
        last_activity_at__lte=cutoff,
        desired_state=DesiredState.RUNNING,
        requested_seq=F("handled_seq"),
    )
    if after is not None:
        rows = rows.filter(last_activity_at__gte=after[0]).exclude(
            last_activity_at=after[0], id__lte=after[1]
        )
    return rows.order_by("last_activity_at", "id").values_list(
        "id", "name", "template", "runtime", "status", "generation", "last_activity_at"
    )


def idle_candidates(cutoff: datetime, batch_size: int) -> Iterator[list[Candidate]]:
    after: tuple[datetime, UUID] | None = None
    while True:
        batch = [
            Candidate(ws_id, name, template, runtime, WorkspaceStatus(status), generation, seen)
            for ws_id, name, template, runtime, status, generation, seen in idle_candidates_query(
                cutoff, after
            )[:batch_size]
        ]
        if not batch:
            return
        yield batch
        if len(batch) < batch_size:
            return
        after = (batch[-1].last_activity_at, batch[-1].id)


def judge(row: Candidate, now: datetime, template_set: TemplateSet) -> Idle | None:
    errors = template_set.errors_for(row.template)
    if errors:
        raise ValueError("manifest is malformed: " + "; ".join(str(error) for error in errors))
    timeout, deadline = idle_deadline(
        status=row.status,
        desired_state=DesiredState.RUNNING,
        template=row.template,
        runtime=row.runtime,
        last_activity_at=row.last_activity_at,
        template_set=template_set,
    )
    if deadline is None or deadline > now:
        return None
    return Idle(row, timeout, deadline)


def sweep_idle(
    *,
    now: datetime | None = None,
    batch_size: int | None = None,
    between_scan_and_stop: BetweenScanAndStop | None = None,
) -> IdleReport:
    """Run one idle sweep; never raises for a bad row. Overlapping sweeps are harmless: every
    stop is a compare-and-set."""
    now = now or timezone.now()
    size = batch_size or int(settings.IDLE_SWEEP_BATCH_SIZE)
    report = IdleReport()
    template_set = templates()
    shortest = shortest_timeout(template_set)
    if not shortest:
        return report  # no template has an idle timeout: nothing to read
    cutoff = now - timedelta(seconds=shortest)
    for batch in idle_candidates(cutoff, size):
        report.scanned += len(batch)
        idle: list[Idle] = []
        for row in batch:
            try:
                verdict = judge(row, now, template_set)
            except ValueError as exc:
                report.skipped.append((row.id, str(exc)))
                logger.warning("idle sweep skipped workspace %s: %s", row.id, exc)
                continue
            if verdict is not None:
                idle.append(verdict)
        if between_scan_and_stop is not None:
            between_scan_and_stop(idle)
        for item in idle:
            try:
                changed = services.request_idle_stop(
                    item.row.id,
                    generation=item.row.generation,
                    status=item.row.status,
                    last_activity_at=item.row.last_activity_at,
                    timeout_secs=item.timeout_secs,
                    now=now,
                )
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # one bad row is reported, never a crash loop
                if not connection.is_usable():
                    raise
                logger.exception("idle sweep could not stop workspace %s", item.row.id)
                report.skipped.append((item.row.id, f"{exc.__class__.__name__}: {exc}"))
                continue
            (report.stopped if changed else report.left_alone).append(item.row.id)
    if report.stopped or report.skipped:
        logger.info(
            "idle sweep: scanned %d, stopped %d, left alone %d, skipped %d",
            report.scanned,
            len(report.stopped),
            len(report.left_alone),
            len(report.skipped),
        )
    return report
