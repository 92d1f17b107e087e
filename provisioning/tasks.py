"""Celery tasks: as thin as an API endpoint. They take ids, never model instances."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.db.models import F
from django.utils import timezone
from redis.exceptions import RedisError

from provisioning import gate, idle, lifecycle, pools, sweeper
from provisioning.backends.base import TransientBackendError
from provisioning.liveness import sweep_missed_heartbeats
from provisioning.reconciler import reconcile_once
from workspaces import metrics, services
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

logger = logging.getLogger(__name__)
# A lost PostgreSQL connection (a restart, a failover, a killed backend) or Redis blip fails the
# attempt, not the intent: the task retries with backoff on a fresh connection (Celery's Django
# fixup closes unusable connections between tasks), and past its retries the row still holds the
# intent for the redrive sweep.
TRANSIENT_SERVICE_ERRORS = (OperationalError, InterfaceError, RedisError)


@shared_task(
    bind=True,
    name=services.CONVERGE_TASK,
    acks_late=True,
    autoretry_for=(TransientBackendError, *TRANSIENT_SERVICE_ERRORS),
    retry_backoff=settings.CONVERGE_RETRY_BACKOFF_SECONDS,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=settings.CONVERGE_MAX_RETRIES,
    time_limit=settings.CYCLE_TIME_LIMIT_SECONDS,
    soft_time_limit=settings.CYCLE_SOFT_TIME_LIMIT_SECONDS,
)
def converge_workspace(self: Any, workspace_id: str, busy_retry: bool = False) -> list[str]:
    """Bring one workspace's backend to what was asked (provision / start / stop / restart /
    remove), under its gate. Safe to run any number of times, in any order."""
    if busy_retry:
        gate.release_retry(workspace_id)
    gate.release_redrive(workspace_id)
    final_attempt = self.request.retries >= settings.CONVERGE_MAX_RETRIES
    try:
        done = lifecycle.converge(
            UUID(workspace_id), holder=self.request.hostname, final_attempt=final_attempt
        )
    except gate.GateBusy:
        metrics.GATE_BUSY.inc()
        # A cycle runs now. Its loop re-reads the intent when it finishes; one retry comes back
        # shortly in case the holder read the row before this request or died (its lease then
        # expires). Requests that find a retry already scheduled leave it at that: coalescing.
        countdown = settings.GATE_BUSY_RETRY_SECONDS
        if gate.claim_retry(workspace_id, countdown):
            converge_workspace.apply_async(
                (workspace_id,), {"busy_retry": True}, countdown=countdown
            )
        return []
    if len(done) >= lifecycle.MAX_CYCLES_PER_HOLD:
        # The hold stopped at its cap so one busy workspace cannot keep a worker to itself;
        # whatever intent is left goes back to the queue.
        converge_workspace.delay(workspace_id)
    return done


def _sweep_task(name: str) -> Any:
    """A beat sweep's task: short limits of its own. The soft limit goes with the hard one, since
    the global soft limit (a cycle's) is longer than a sweep's hard limit and Celery refuses to
    send a task whose soft limit exceeds its hard one."""
    return shared_task(
        name=name,
        time_limit=settings.SWEEP_TIME_LIMIT_SECONDS,
        soft_time_limit=settings.SWEEP_SOFT_TIME_LIMIT_SECONDS,
    )


@_sweep_task("provisioning.redrive_pending")
def redrive_pending() -> int:
    """Enqueue a converge for workspaces whose intent has waited too long with no gate held (a
    whole worker node died, or the broker was down when the request committed: the row is the
    outbox), and act on the restart policy's restarts that are due. A workspace is redriven at
    most once while its task waits in the queue (``gate.claim_redrive``)."""
    cutoff = timezone.now() - timedelta(seconds=settings.REDRIVE_INTERVAL_SECONDS)
    # Served by the partial index ws_pending_intent (requested_seq > handled_seq).
    pending = (
        Workspace.objects.filter(requested_seq__gt=F("handled_seq"), updated_at__lt=cutoff)
        .exclude(status=WorkspaceStatus.REMOVED)
        .values_list("id", flat=True)[:1000]
    )
    count = 0
    for workspace_id in pending:
        if not gate.is_held(workspace_id) and gate.claim_redrive(workspace_id):
            if services.send_converge(workspace_id):
                count += 1
            else:
                gate.release_redrive(workspace_id)
    # Served by the partial index ws_restart_pending (restart_at IS NOT NULL).
    due = Workspace.objects.filter(restart_at__lte=timezone.now()).values_list("id", flat=True)
    restarted = sum(services.restart_due(workspace_id) for workspace_id in due[:1000])
    if count or restarted:
        logger.info("redrove %d workspaces with pending intents, %d due restarts", count, restarted)
    metrics.record_sweep("redrive", {"redriven": count, "restarted": restarted})
    return count + restarted


@shared_task(
    name=services.RESTART_DUE_TASK,
    acks_late=True,
    autoretry_for=TRANSIENT_SERVICE_ERRORS,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=settings.CONVERGE_MAX_RETRIES,
    time_limit=settings.SWEEP_TIME_LIMIT_SECONDS,
    soft_time_limit=settings.SWEEP_SOFT_TIME_LIMIT_SECONDS,
)
def restart_due(workspace_id: str) -> bool:
    """The restart policy's backoff has passed: restart the workspace if still wanted."""
    return services.restart_due(UUID(workspace_id))


@_sweep_task("provisioning.reconcile")
def reconcile() -> dict[str, Any]:
    """One reconciliation pass: the rows follow what the backends say; orphans are removed."""
    summary = reconcile_once().summary()
    metrics.record_reconcile(summary)
    return summary


@_sweep_task("provisioning.sweep_pools")
def sweep_pools() -> list[str]:
    """Refill every warm pool and retire the members that must not be claimed."""
    return [report.line() for report in pools.sweep()]


@_sweep_task(services.REFILL_TASK)
def refill_pool(template: str) -> list[str]:
    """A claim took a member: sweep that pool once its claims pause, so the next create finds
    one too (sent with a countdown; comes back while claims keep coming)."""
    done = pools.refill_after_claims(template)
    if isinstance(done, float):
        refill_pool.apply_async((template,), countdown=done)
        return []
    return [report.line() for report in done]


@_sweep_task("provisioning.sweep_liveness")
def sweep_liveness() -> int:
    """Online or degraded workspaces whose heartbeats stopped become offline."""
    count = len(sweep_missed_heartbeats())
    metrics.record_sweep("liveness", {"offline": count})
    return count


@_sweep_task("provisioning.sweep_provisioning")
def sweep_provisioning() -> dict[str, Any]:
    """Fail workspaces stuck in provisioning past their deadline (run by beat; see sweeper)."""
    summary = sweeper.sweep().summary()
    metrics.record_sweep(
        "provisioning",
        {
            key: (int(value) if isinstance(value, bool) else len(value))
            for key, value in summary.items()
            if key in ("flipped", "left_alone", "skipped", "deferred", "overlapped")
        },
    )
    return summary


@_sweep_task("provisioning.sweep_idle")
def sweep_idle() -> dict[str, Any]:
    """Stop workspaces idle longer than their template's idle timeout (see provisioning.idle)."""
    summary = idle.sweep_idle().summary()
    metrics.record_sweep(
        "idle", {key: len(summary[key]) for key in ("stopped", "left_alone", "skipped")}
    )
    return summary
