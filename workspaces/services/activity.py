"""Activity signals and the idle auto-stop: the writes behind the idle policy.

``record_activity`` is the cheap per-request signal (the workspace's proxy route calls it on
every request it lets through): at most one row write per ``ACTIVITY_WRITE_INTERVAL_SECONDS`` per
workspace. ``request_idle_stop`` is the idle sweep's flip: the same intent a person's stop records
(``desired_state = stopped``, ``requested_seq += 1``, status ``stopping``, a converge task after
commit), by compare-and-set on what the sweep read, so a workspace used meanwhile keeps running.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from redis.exceptions import RedisError

from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.services.common import _enqueue_converge, transition
from workspaces.status import DesiredState, EventSource, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus
IDLE_POLICY = "idle_timeout"


def _activity_key(workspace_id: UUID | str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:activity:{workspace_id}"


def record_activity(workspace_id: UUID | str, source: str = "proxy") -> bool:
    """Note that the workspace is in use now (``source``: ``proxy``, ``api``, ...). Returns
    whether the row was written.

    Cheap enough to call on every request: one Redis ``SET NX EX`` decides whether this call
    writes; at most one call per workspace per ``ACTIVITY_WRITE_INTERVAL_SECONDS`` does. Without
    Redis the UPDATE's own condition (the stored time is older than the interval) is the limit.
    Never raises for a missing workspace or a malformed id. The idle sweep treats a timeout
    shorter than the interval as the interval, so a call skipped here can never be what lets the
    sweep stop it.
    """
    try:
        workspace_id = UUID(str(workspace_id))
    except ValueError:
        return False  # not a workspace id: nothing to record
    interval = int(settings.ACTIVITY_WRITE_INTERVAL_SECONDS)
    try:
        if not get_redis().set(_activity_key(workspace_id), source, nx=True, ex=interval):
            return False  # written less than `interval` ago
    except RedisError as exc:
        logger.debug("activity rate limit unavailable (%s); asking the database", exc)
    now = timezone.now()
    # updated_at is left alone on purpose: the redrive sweep measures pending intents by it.
    written = (
        Workspace.objects.filter(
            id=workspace_id, last_activity_at__lt=now - timedelta(seconds=interval)
        )
        .exclude(status=S.REMOVED)
        .update(last_activity_at=now)
    )
    return written == 1


def request_idle_stop(
    workspace_id: UUID,
    *,
    generation: int,
    status: WorkspaceStatus,
    last_activity_at: datetime,
    timeout_secs: int,
    now: datetime,
) -> bool:
    """The idle sweep's flip: record a stop, exactly as ``request_stop`` does, but only if the
    row is still what the sweep read: same status, same generation, same ``last_activity_at``,
    still meant to run with no request pending. Activity, a restart or any request that lands
    after the scan changes one of those, and the row is left alone (returns False).

    The stop itself runs under the workspace's gate like any stop; its ``WORKSPACE_STOPPED``
    event carries ``source = idle_stop`` and the policy (``stop_reason``)."""
    reason: dict[str, Any] = {
        "policy": IDLE_POLICY,
        "idle_timeout_seconds": timeout_secs,
        "last_activity_at": last_activity_at.isoformat(),
        "idle_seconds": int((now - last_activity_at).total_seconds()),
        "source": EventSource.IDLE_STOP.value,
    }
    with transaction.atomic():
        changed = transition(
            workspace_id,
            S.STOPPING,
            expect_generation=generation,
            expect_status=status,
            when=Q(
                last_activity_at=last_activity_at,
                desired_state=DesiredState.RUNNING,
                requested_seq=F("handled_seq"),
            ),
            desired_state=DesiredState.STOPPED,
            requested_seq=F("requested_seq") + 1,
            stop_reason=reason,
        )
        if changed:
            _enqueue_converge(workspace_id)
    if changed:
        logger.info(
            "workspace %s idle for %d s (policy %s, timeout %d s): stop requested",
            workspace_id,
            reason["idle_seconds"],
            IDLE_POLICY,
            timeout_secs,
        )
    return changed
