"""The stuck-provisioning sweep: fail workspaces that did not register before their deadline.

Run by Celery beat every ``SWEEP_PROVISIONING_INTERVAL_SECONDS`` (task
``provisioning.sweep_provisioning``) and by ``python manage.py sweep_provisioning``. Small steps,
in the manner of Healthchecks' ``sendalerts``:

1. **Scan** the rows in flight (``status = provisioning``), oldest first, in keyset batches. The
   partial index ``ws_provisioning_inflight`` holds only those rows, so the cost grows with the
   rows in flight, not with the table.
2. **Judge** each row now: its deadline is ``provisioning_started_at`` plus
   ``provision_timeout_seconds(template, runtime)``, the one accessor the API also uses, resolved
   at sweep time so an edited manifest counts at once. A row whose manifest is broken is skipped
   and reported, never flipped on a guessed deadline.
3. **Flip** each overdue row by compare-and-set (``services.fail_stuck_provisioning``): status,
   generation and ``provisioning_started_at`` must still be what the scan read. Zero rows means
   someone else got there first (the agent registered, a new cycle began, another sweep flipped
   it): leave it. The flip records ``WORKSPACE_PROVISION_FAILED`` (``source =
   provision_timeout_sweep``) and the intent "stopped"; the lifecycle stops what is left running
   under the workspace's gate, keeping the row ``failed``.

A row that raises is skipped and reported, and pushed forward: later sweeps leave it alone for
``SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS``, so one bad row neither stops the others nor makes
every sweep fail. Overlapping sweeps (two beats, beat and ``manage.py``) are harmless because
every flip is a compare-and-set; a short Redis lock only saves the duplicate work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection
from django.db.models import QuerySet
from django.utils import timezone
from redis.exceptions import LockError, RedisError

from workspaces import services
from workspaces.manifests import TemplateSet, templates
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.status import WorkspaceStatus
from workspaces.timeouts import provision_timeout_seconds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InFlight:
    """A provisioning row as the scan read it (never its env)."""

    id: UUID
    name: str
    template: str
    runtime: str
    generation: int
    started_at: datetime


@dataclass(frozen=True)
class Overdue:
    row: InFlight
    timeout_secs: int
    deadline: datetime


@dataclass(frozen=True)
class Flipped:
    workspace_id: UUID
    name: str
    template: str
    runtime: str
    generation: int
    timeout_secs: int
    overdue_secs: float

    def line(self) -> str:
        return (
            f"flipped {self.workspace_id} ({self.name}) template={self.template} "
            f"runtime={self.runtime} generation={self.generation} "
            f"timeout_secs={self.timeout_secs} overdue_secs={self.overdue_secs:.0f}"
        )


@dataclass(frozen=True)
class Skipped:
    workspace_id: UUID
    reason: str

    def line(self) -> str:
        return f"skipped {self.workspace_id}: {self.reason}"


@dataclass
class SweepReport:
    scanned: int = 0
    flipped: list[Flipped] = field(default_factory=list)
    # Overdue when scanned, but the compare-and-set matched nothing: someone else got there.
    left_alone: list[UUID] = field(default_factory=list)
    # Bad rows (broken manifest, an error while flipping): reported, not flipped.
    skipped: list[Skipped] = field(default_factory=list)
    # Rows that failed a recent sweep and are still pushed forward.
    deferred: list[UUID] = field(default_factory=list)
    # Another sweep held the lock: this one did nothing.
    overlapped: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "flipped": [str(item.workspace_id) for item in self.flipped],
            "left_alone": [str(item) for item in self.left_alone],
            "skipped": [
                {"id": str(item.workspace_id), "reason": item.reason} for item in self.skipped
            ],
            "deferred": [str(item) for item in self.deferred],
            "overlapped": self.overlapped,
        }


# Called with the overdue rows of a batch after the scan and before any flip. Production passes
# nothing; tests use it to make a race (e.g. an agent registering) happen at exactly that point.
BetweenScanAndFlip = Callable[[Sequence[Overdue]], None]


def in_flight_query(now: datetime, after: tuple[datetime, UUID] | None = None) -> QuerySet[Any]:
    """The scan's query: rows in ``provisioning`` started by ``now``, after the keyset ``after``,
    oldest first. A test checks that PostgreSQL serves it from ``ws_provisioning_inflight``."""
    # A warm pool's member waits in provisioning for as long as nobody claims it; the pool
    # sweep (provisioning/pools.py) owns it, and its claim starts the clock anew.
    rows = Workspace.objects.filter(
        status=WorkspaceStatus.PROVISIONING, provisioning_started_at__lte=now, pool=""
    )
    if after is not None:
        rows = rows.filter(provisioning_started_at__gte=after[0]).exclude(
            provisioning_started_at=after[0], id__lte=after[1]
        )
    return rows.order_by("provisioning_started_at", "id").values_list(
        "id", "name", "template", "runtime", "generation", "provisioning_started_at"
    )


def in_flight_rows(now: datetime, batch_size: int) -> Iterator[list[InFlight]]:
    """Batches of rows in ``provisioning``, oldest first, by keyset on (started_at, id).

    Served by the partial index ``ws_provisioning_inflight``:
        SELECT ... WHERE status = 'provisioning' AND provisioning_started_at >= %s
          AND provisioning_started_at <= %s ORDER BY provisioning_started_at, id LIMIT %s
    """
    after: tuple[datetime, UUID] | None = None
    while True:
        batch = [
            InFlight(workspace_id, name, template, runtime, generation, started_at)
            for workspace_id, name, template, runtime, generation, started_at in in_flight_query(
                now, after
            )[:batch_size]
            if started_at is not None  # excluded by the filter; narrows the type
        ]
        if not batch:
            return
        yield batch
        if len(batch) < batch_size:
            return
        after = (batch[-1].started_at, batch[-1].id)


class BrokenManifest(Exception):
    """The row's template manifest is malformed: its deadline cannot be trusted."""


def judge(row: InFlight, now: datetime, template_set: TemplateSet) -> Overdue | None:
    """The row's deadline, resolved now by the one accessor; ``Overdue`` once it has passed."""
    errors = template_set.errors_for(row.template)
    if errors:
        # Falling back to a shorter default here is exactly how healthy slow boots got killed:
        # do not flip on a guess; `manage.py check` names the file and field to fix.
        raise BrokenManifest("; ".join(str(error) for error in errors))
    timeout = provision_timeout_seconds(row.template, row.runtime, template_set=template_set)
    deadline = row.started_at + timedelta(seconds=timeout)
    return Overdue(row, timeout, deadline) if deadline < now else None


def _poison_key(workspace_id: UUID) -> str:
    return f"{settings.GATE_KEY_PREFIX}:sweep-provisioning:poison:{workspace_id}"


def _lock_key() -> str:
    return f"{settings.GATE_KEY_PREFIX}:sweep-provisioning:lock"


def _push_forward(workspace_id: UUID, reason: str) -> None:
    try:
        get_redis().set(
            _poison_key(workspace_id),
            reason[:500],
            ex=settings.SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS,
        )
    except RedisError as exc:
        logger.warning("could not push poison row %s forward: %s", workspace_id, exc)


def _still_pushed_forward(overdue: list[Overdue]) -> set[UUID]:
    if not overdue:
        return set()
    try:
        flags = cast(list[Any], get_redis().mget([_poison_key(item.row.id) for item in overdue]))
    except RedisError as exc:
        # Without Redis every overdue row is tried; a poison row then fails once per sweep.
        logger.warning("could not read the sweep's poison rows: %s", exc)
        return set()
    return {item.row.id for item, flag in zip(overdue, flags, strict=True) if flag is not None}


def _flip(item: Overdue, now: datetime, report: SweepReport) -> None:
    row = item.row
    changed = services.fail_stuck_provisioning(
        row.id,
        generation=row.generation,
        started_at=row.started_at,
        timeout_secs=item.timeout_secs,
        template=row.template,
        runtime=row.runtime,
    )
    if not changed:
        # The compare-and-set matched nothing: the agent registered, a new cycle began, a stop
        # or delete arrived, or another sweep flipped it. Theirs to decide, not ours.
        report.left_alone.append(row.id)
        return
    report.flipped.append(
        Flipped(
            workspace_id=row.id,
            name=row.name,
            template=row.template,
            runtime=row.runtime,
            generation=row.generation,
            timeout_secs=item.timeout_secs,
            overdue_secs=(now - item.deadline).total_seconds(),
        )
    )


def _skip(report: SweepReport, workspace_id: UUID, reason: str, *, push_forward: bool) -> None:
    report.skipped.append(Skipped(workspace_id, reason))
    logger.warning("sweep skipped workspace %s: %s", workspace_id, reason)
    if push_forward:
        _push_forward(workspace_id, reason)


def _sweep(
    now: datetime, batch_size: int, between_scan_and_flip: BetweenScanAndFlip | None
) -> SweepReport:
    report = SweepReport()
    # One snapshot per sweep, taken now: a manifest edited since the last sweep counts at once.
    template_set = templates()
    for batch in in_flight_rows(now, batch_size):
        report.scanned += len(batch)
        overdue: list[Overdue] = []
        for row in batch:
            try:
                verdict = judge(row, now, template_set)
            except BrokenManifest as exc:
                _skip(report, row.id, f"manifest is malformed: {exc}", push_forward=False)
                continue
            except SoftTimeLimitExceeded:
                raise  # the sweep as a whole ran out of time: not this row's fault
            except Exception as exc:  # one bad row is reported, never a crash loop
                logger.exception("sweep could not judge workspace %s", row.id)
                _skip(report, row.id, f"{exc.__class__.__name__}: {exc}", push_forward=True)
                continue
            if verdict is not None:
                overdue.append(verdict)
        pushed = _still_pushed_forward(overdue)
        report.deferred.extend(item.row.id for item in overdue if item.row.id in pushed)
        overdue = [item for item in overdue if item.row.id not in pushed]
        if between_scan_and_flip is not None:
            between_scan_and_flip(overdue)
        for item in overdue:
            try:
                _flip(item, now, report)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # one bad row is reported, never a crash loop
                if not connection.is_usable():
                    raise  # the database went away: every row would fail, none is to blame
                # The flip's transaction rolled back; the connection is usable for the next row.
                logger.exception("sweep could not flip workspace %s", item.row.id)
                _skip(report, item.row.id, f"{exc.__class__.__name__}: {exc}", push_forward=True)
    return report


def sweep(
    *,
    now: datetime | None = None,
    use_lock: bool = True,
    batch_size: int | None = None,
    between_scan_and_flip: BetweenScanAndFlip | None = None,
) -> SweepReport:
    """Run one stuck-provisioning sweep and report what it did. Never raises for a bad row."""
    now = now or timezone.now()
    size = batch_size or int(settings.SWEEP_PROVISIONING_BATCH_SIZE)
    lock = None
    if use_lock:
        lock = get_redis().lock(
            _lock_key(),
            # Expires with the task's hard time limit, so a sweeper that died frees it.
            timeout=settings.SWEEP_TIME_LIMIT_SECONDS,
            blocking=False,
            thread_local=False,
        )
        try:
            if not lock.acquire(blocking=False):
                logger.info("another stuck-provisioning sweep is running; skipping this one")
                return SweepReport(overlapped=True)
        except RedisError as exc:
            # The lock only saves work; correctness is the compare-and-set. Sweep without it.
            logger.warning("sweep lock unavailable (%s); sweeping without it", exc)
            lock = None
    try:
        report = _sweep(now, size, between_scan_and_flip)
    finally:
        if lock is not None:
            try:
                lock.release()
            except (LockError, RedisError):
                logger.warning("sweep lock expired before release")
    if report.flipped or report.skipped:
        logger.info(
            "stuck-provisioning sweep: scanned %d, flipped %d, left alone %d, skipped %d, "
            "deferred %d",
            report.scanned,
            len(report.flipped),
            len(report.left_alone),
            len(report.skipped),
            len(report.deferred),
        )
    return report
