"""Celery tasks: as thin as an API endpoint. They take ids, never model instances."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import shared_task
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from provisioning import gate, lifecycle
from provisioning.backends.base import TransientBackendError
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

logger = logging.getLogger(__name__)
CONVERGE_MAX_RETRIES = 5


@shared_task(
    bind=True,
    name="provisioning.converge",
    acks_late=True,
    autoretry_for=(TransientBackendError,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=CONVERGE_MAX_RETRIES,
    time_limit=settings.CYCLE_TIME_LIMIT_SECONDS,
    soft_time_limit=settings.CYCLE_SOFT_TIME_LIMIT_SECONDS,
)
def converge_workspace(self: Any, workspace_id: str, busy_retry: bool = False) -> list[str]:
    """Bring one workspace's backend to what was asked (provision / start / stop / restart /
    remove), under its gate. Safe to run any number of times, in any order."""
    if busy_retry:
        gate.release_retry(workspace_id)
    final_attempt = self.request.retries >= CONVERGE_MAX_RETRIES
    try:
        done = lifecycle.converge(
            UUID(workspace_id), holder=self.request.hostname, final_attempt=final_attempt
        )
    except gate.GateBusy:
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
    """Enqueue a converge for workspaces whose intent has waited too long with no gate held (for
    instance after a whole worker node died): a safety net, never the primary path."""
    cutoff = timezone.now() - timedelta(seconds=settings.REDRIVE_INTERVAL_SECONDS)
    # Served by the partial index ws_pending_intent (requested_seq > handled_seq).
    pending = (
        Workspace.objects.filter(requested_seq__gt=F("handled_seq"), updated_at__lt=cutoff)
        .exclude(status=WorkspaceStatus.REMOVED)
        .values_list("id", flat=True)[:1000]
    )
    count = 0
    for workspace_id in pending:
        if not gate.is_held(workspace_id):
            converge_workspace.delay(str(workspace_id))
            count += 1
    if count:
        logger.info("redrove %d workspaces with pending intents", count)
    return count


@_sweep_task("provisioning.reconcile")
def reconcile() -> dict[str, Any]:
    """One reconciliation pass: the rows follow what the backends say; orphans are removed."""
    from provisioning.reconciler import reconcile_once

    return reconcile_once().summary()


@_sweep_task("provisioning.sweep_liveness")
def sweep_liveness() -> int:
    """Online or degraded workspaces whose heartbeats stopped become offline."""
    from provisioning.liveness import sweep_missed_heartbeats

    return len(sweep_missed_heartbeats())


@_sweep_task("provisioning.sweep_provisioning")
def sweep_provisioning() -> dict[str, Any]:
    """Fail workspaces stuck in provisioning past their deadline (run by beat; see sweeper)."""
    from provisioning import sweeper

    return sweeper.sweep().summary()
