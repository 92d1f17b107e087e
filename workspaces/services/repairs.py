"""Repairs by the reconciler and the liveness sweep."""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from workspaces.manifests import templates
from workspaces.models import Workspace, WorkspaceEvent, event_payload
from workspaces.services.common import _enqueue_converge, _locked, record_event, transition
from workspaces.status import (
    DesiredState,
    EventSource,
    EventType,
    WorkspaceStatus,
)

logger = logging.getLogger(__name__)
S = WorkspaceStatus
# The engine's task that acts on a due restart, enqueued by its name (provisioning.tasks).
RESTART_DUE_TASK = "provisioning.restart_due"


# --- reconciliation and liveness -----------------------------------------------------------------
# The reconciler calls these under the workspace's gate, fenced by the generation it read there:
# no cycle runs meanwhile, and if its lease expired and a cycle took over, nothing is written.
# None of them bumps the generation: a repair is not a cycle, so the current agent's token stays
# valid and a heartbeat of an instance that turns out to be alive brings the row back online.
def record_instance_gone(
    workspace_id: UUID,
    generation: int,
    *,
    exit_code: int | None = None,
    detail: str = "",
    output_tail: str = "",
) -> WorkspaceStatus | None:
    """The backend says the instance no longer runs while the row says it does (it died, or was
    stopped behind the platform's back). Returns the status written, or None when the row moved
    on and there was nothing to repair. Every death is one event carrying the exit code (when the
    backend knows it) and the last lines of the workspace's output.

    With the restart policy ``on-failure`` (the default) a workspace wanted running whose instance
    exited (whatever its code: the platform did not ask it to) becomes ``offline`` with a restart
    scheduled after a backoff
    (``restart_at``; the task ``provisioning.restart_due`` and the redrive sweep act on it); the
    ``RESTART_MAX_FAILURES``-th such death within ``RESTART_FAILURE_WINDOW_SECONDS`` makes it
    ``failed``. Otherwise (``never``, or not wanted running): ``online``/``degraded``/
    ``offline`` become ``offline``, or ``failed`` when the backend knows a non-zero exit code.
    A ``provisioning`` workspace whose instance died before its agent registered fails, unless
    it is a restart of the policy's (a crash loop is counted, not failed at the first death); a
    ``failed`` one only stops claiming to run.
    """
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.generation != generation or not workspace.is_running:
            return None
        previous = WorkspaceStatus(workspace.status)
        now = timezone.now()
        facts = event_payload(
            previous=previous.value,
            exit_code=exit_code,
            detail=detail or None,
            reason="instance_gone",
            output=output_tail or None,
        )
        crashed = exit_code is not None and exit_code != 0
        deaths = _restartable_deaths(workspace, now) if _restart_wanted(workspace) else 0
        restarting = deaths > 0 and (
            previous in (S.ONLINE, S.DEGRADED, S.OFFLINE)
            or (previous == S.PROVISIONING and deaths > 1)
        )
        what = f"the instance exited ({_exit_text(exit_code)})"
        if output_tail:
            what += f"; its last output: {_last_line(output_tail)}"
        if previous == S.FAILED:
            target, event_type = S.FAILED, EventType.STOPPED
            fields: dict[str, Any] = {"is_running": False}
        elif restarting and deaths >= settings.RESTART_MAX_FAILURES:
            message = (
                f"gave up restarting: {what}, the {deaths}th death within "
                f"{settings.RESTART_FAILURE_WINDOW_SECONDS} s (restart: on-failure)"
            )
            target, event_type = S.FAILED, EventType.PROVISION_FAILED
            fields = {"is_running": False, "last_error": message, "restart_at": None}
            facts.update(message=message, restart_attempt=deaths, restart="gave_up")
        elif restarting:
            delay = restart_backoff_seconds(deaths)
            message = f"{what}; restart {deaths} in {delay} s (restart: on-failure)"
            target, event_type = S.OFFLINE, EventType.OFFLINE
            fields = {
                "is_running": False,
                "last_error": message,
                "restart_at": now + timedelta(seconds=delay),
            }
            facts.update(message=message, restart_attempt=deaths, restart_in_seconds=delay)
            transaction.on_commit(
                functools.partial(_schedule_restart, workspace_id, delay), robust=True
            )
        elif previous == S.PROVISIONING or (
            crashed and previous in (S.ONLINE, S.DEGRADED, S.OFFLINE)
        ):
            message = (
                "the instance stopped before its agent registered"
                if previous == S.PROVISIONING
                else "the instance stopped behind the platform's back"
            )
            if exit_code is not None:
                message += f" (exit code {exit_code})"
            if output_tail:
                message += f"; its last output: {_last_line(output_tail)}"
            target, event_type = S.FAILED, EventType.PROVISION_FAILED
            fields = {"is_running": False, "last_error": message}
            facts["message"] = message
        elif previous in (S.ONLINE, S.DEGRADED, S.OFFLINE):
            target, event_type = S.OFFLINE, EventType.OFFLINE
            fields = {"is_running": False}
        else:
            return None  # stopping / removing / stopped: a cycle's business, not a repair
        if not transition(
            workspace_id,
            target,
            expect_generation=generation,
            expect_status=previous,
            **fields,
        ):
            return None
        record_event(workspace_id, event_type, EventSource.RECONCILER, generation, facts)
    logger.warning(
        "reconciler: workspace %s instance gone (%s -> %s)%s",
        workspace_id,
        previous.value,
        target.value,
        f": {detail}" if detail else "",
    )
    return target


def restart_backoff_seconds(attempt: int) -> int:
    """The wait before the policy's ``attempt``-th restart: base * 2 ** (attempt - 1), capped."""
    base, cap = settings.RESTART_BACKOFF_BASE_SECONDS, settings.RESTART_BACKOFF_MAX_SECONDS
    return int(min(cap, base * 2 ** min(attempt - 1, 32)))


def _restart_wanted(workspace: Workspace) -> bool:
    """A workspace is a long-running service: under ``on-failure`` any exit the platform did not
    ask for while it is wanted running is a failure, exit code 0 included (an agent that handles
    SIGTERM exits 0 when an engine restart or a person outside the platform stops it)."""
    if workspace.desired_state != DesiredState.RUNNING:
        return False
    manifest = templates().get(workspace.template)
    return (manifest.restart if manifest is not None else "on-failure") == "on-failure"


def _restartable_deaths(workspace: Workspace, now: datetime) -> int:
    """This death's number among the policy's deaths within the failure window (1 = first)."""
    window_start = now - timedelta(seconds=settings.RESTART_FAILURE_WINDOW_SECONDS)
    earlier = WorkspaceEvent.objects.filter(
        workspace_id=workspace.id,
        source=EventSource.RECONCILER,
        created_at__gte=window_start,
        payload__has_key="restart_attempt",
    ).count()
    return earlier + 1


def _exit_text(exit_code: int | None) -> str:
    if exit_code is None:
        return "exit code unknown"
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


def _last_line(output_tail: str) -> str:
    lines = [line for line in output_tail.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def _schedule_restart(workspace_id: UUID, delay: int) -> None:
    try:
        current_app.send_task(RESTART_DUE_TASK, (str(workspace_id),), countdown=delay)
    except (BrokerError, RedisError, OSError) as exc:
        # restart_at is committed: the redrive sweep restarts it once the broker is back.
        logger.warning("could not schedule the restart of %s (%s)", workspace_id, exc)


def restart_due(workspace_id: UUID) -> bool:
    """Act on a restart the policy scheduled, if it is still wanted and due: record a start
    intent and enqueue its converge. Returns whether it did. A stop, start, restart or delete
    request cleared ``restart_at`` meanwhile: then nothing happens."""
    with transaction.atomic():
        workspace = _locked(workspace_id)
        now = timezone.now()
        # A countdown may fire a moment early on another clock: one second of slack.
        if workspace.restart_at is None or workspace.restart_at > now + timedelta(seconds=1):
            return False
        wanted = (
            workspace.desired_state == DesiredState.RUNNING
            and workspace.status == S.OFFLINE
            and not workspace.is_running
        )
        Workspace.objects.filter(id=workspace_id).update(
            restart_at=None,
            requested_seq=F("requested_seq") + (1 if wanted else 0),
            updated_at=now,
        )
        if wanted:
            _enqueue_converge(workspace_id)
    if wanted:
        logger.info("restart policy: restarting workspace %s", workspace_id)
    return wanted


def record_unwanted_instance_stopped(
    workspace_id: UUID, generation: int, *, backend_state: dict[str, Any], detail: str = ""
) -> bool:
    """The reconciler stopped an instance that ran while the row said ``stopped`` or
    ``failed`` (policy: the last word was not "run", so the instance goes, not the row)."""
    with transaction.atomic():
        workspace = _locked(workspace_id)
        previous = WorkspaceStatus(workspace.status)
        if workspace.generation != generation or previous not in (S.STOPPED, S.FAILED):
            return False
        if not transition(
            workspace_id,
            previous,
            expect_generation=generation,
            expect_status=previous,
            is_running=False,
            backend_state=backend_state,
        ):
            return False
        record_event(
            workspace_id,
            EventType.STOPPED,
            EventSource.RECONCILER,
            generation,
            event_payload(
                reason="running_while_not_wanted",
                previous=previous.value,
                action="stopped the instance",
                detail=detail or None,
            ),
        )
    logger.warning("reconciler: stopped an instance of %s workspace %s", previous, workspace_id)
    return True


def record_instance_found_running(workspace_id: UUID, generation: int, *, detail: str = "") -> bool:
    """An ``offline`` row said "not running" but the backend runs the instance: the row follows.
    It stays ``offline`` until the agent's next heartbeat says it is healthy."""
    with transaction.atomic():
        changed = transition(
            workspace_id,
            S.OFFLINE,
            expect_generation=generation,
            expect_status=S.OFFLINE,
            when=Q(is_running=False),
            is_running=True,
        )
        if changed:
            record_event(
                workspace_id,
                EventType.OFFLINE,
                EventSource.RECONCILER,
                generation,
                event_payload(reason="instance_running", is_running=True, detail=detail or None),
            )
    return changed


def mark_missed_heartbeats(
    workspace_id: UUID,
    generation: int,
    *,
    previous: WorkspaceStatus,
    last_heartbeat_at: datetime | None,
    window_seconds: int,
) -> bool:
    """``online``/``degraded`` -> ``offline`` because no heartbeat came within the window.

    Compare-and-set on status, generation and the heartbeat the sweep saw: a heartbeat (or a new
    cycle) that lands between the sweep's read and this write leaves the row alone. ``is_running``
    is kept: silence says nothing about the instance (it may be alive but hung, or the network
    may be cut); the reconciler, which asks the backend, clears it if the instance is gone.
    """
    seen = (
        Q(last_heartbeat_at__isnull=True)
        if last_heartbeat_at is None
        else Q(last_heartbeat_at=last_heartbeat_at)
    )
    with transaction.atomic():
        changed = transition(
            workspace_id,
            S.OFFLINE,
            expect_generation=generation,
            expect_status=previous,
            when=seen,
        )
        if changed:
            record_event(
                workspace_id,
                EventType.OFFLINE,
                EventSource.LIVENESS,
                generation,
                event_payload(
                    reason="missed_heartbeats",
                    previous=previous.value,
                    last_heartbeat_at=last_heartbeat_at.isoformat() if last_heartbeat_at else None,
                    window_seconds=window_seconds,
                ),
            )
    if changed:
        logger.warning(
            "workspace %s missed heartbeats for %d s: %s -> offline",
            workspace_id,
            window_seconds,
            previous.value,
        )
    return changed


def record_orphan_removed(workspace_id: UUID, *, backend: str, ref: str = "") -> None:
    """The reconciler removed an instance left behind by a removed workspace."""
    generation = (
        Workspace.objects.filter(id=workspace_id).values_list("generation", flat=True).first()
    )
    if generation is None:
        return
    record_event(
        workspace_id,
        EventType.REMOVED,
        EventSource.RECONCILER,
        generation,
        event_payload(reason="orphan", backend=backend, ref=ref or None),
    )
