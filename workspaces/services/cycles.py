"""Cycle writes, called by ``provisioning.lifecycle`` under the gate and fenced by
``generation``: every write is ``UPDATE ... WHERE id = %s AND generation = %s``, so a holder
whose lease expired and was overtaken changes nothing."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from workspaces.crypto import token_digest
from workspaces.models import AgentToken, Workspace
from workspaces.services.common import (
    IntentChanged,
    LeaseLost,
    _enqueue_converge,
    _fenced,
    _locked,
    record_event,
    transition,
)
from workspaces.status import (
    DesiredState,
    EventSource,
    EventType,
    WorkspaceStatus,
    allowed_sources,
)

logger = logging.getLogger(__name__)
S = WorkspaceStatus


# --- cycle writes (called by provisioning.lifecycle under the gate) -------------------------------
# The intent each kind of cycle answers. A cycle records ``handled_seq`` = the ``requested_seq``
# it locked, so it may begin only while the locked row still asks for what it does: a stop cycle
# that began on a row a start request had just changed would mark that start handled.
_SERVES: dict[WorkspaceStatus, DesiredState] = {
    S.PROVISIONING: DesiredState.RUNNING,
    S.STOPPING: DesiredState.STOPPED,
    S.REMOVING: DesiredState.REMOVED,
}


@dataclass(frozen=True)
class CycleStart:
    workspace: Workspace  # the row as it is after the generation bump
    generation: int
    seq: int  # requested_seq when the cycle began; handled_seq becomes this on completion
    # A start cycle's agent token (raw; only its digest is stored), issued in the transaction
    # that began the cycle: a container's environment is fixed when it is created, so the
    # token must exist before prepare. Empty for the other cycles.
    token: str = ""


def begin_cycle(
    workspace_id: UUID,
    target: WorkspaceStatus,
    *,
    action: str,
    still_owner: Callable[[], bool] | None = None,
) -> CycleStart | None:
    """Bump the generation and move to ``target``; None if the status no longer allows it.

    The lifecycle planned the cycle from a read without the lock; a request may have changed the
    intent since. ``IntentChanged`` (nothing written) when the locked row no longer asks for what
    ``target`` serves, so the lifecycle plans again instead of answering a newer request with the
    wrong cycle.

    ``still_owner`` (the gate's lease check) runs while the row is locked. A holder that passes
    it owned the gate at that moment, so anyone who takes the gate later blocks on this row lock
    until the bump commits and then bumps past it: a holder paused beyond its lease can never
    begin a cycle over a newer holder's. Raises ``LeaseLost`` when the check fails.
    """
    now = timezone.now()
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.desired_state != _SERVES[target]:
            raise IntentChanged(
                f"workspace {workspace_id} now wants {workspace.desired_state}, "
                f"not what a {target} cycle does"
            )
        if workspace.status not in allowed_sources(target):
            return None
        if still_owner is not None and not still_owner():
            raise LeaseLost(f"the gate of workspace {workspace_id} is no longer ours")
        fields: dict[str, Any] = {"generation": workspace.generation + 1}
        if target != S.REMOVING:
            # A claim is handed over by the cycle that begins next, or never: whatever that cycle
            # does, a member is used once (a redelivered one starts the workspace cold).
            fields["claim_pending"] = False
        if target == S.PROVISIONING:
            # The env this cycle launches with is the one locked here: recording its version in
            # the same UPDATE makes "pending env changes" exact. A new instance starts idle-free.
            fields.update(
                provisioning_started_at=now,
                last_error="",
                started_env_version=F("env_version"),
                last_activity_at=now,
            )
        if not transition(workspace_id, target, expect_generation=workspace.generation, **fields):
            return None
        # The row is locked: what the UPDATE wrote is known without reading it back.
        if workspace.status != target:
            workspace.status_changed_at = now
        workspace.status, workspace.updated_at = target, now
        workspace.generation += 1
        token = ""
        if target == S.PROVISIONING:
            token = _replace_agent_token(workspace_id, workspace.generation)
            workspace.provisioning_started_at = workspace.last_activity_at = now
            workspace.last_error = ""
            workspace.started_env_version = workspace.env_version
            record_event(
                workspace_id,
                EventType.PROVISIONING,
                EventSource.LIFECYCLE,
                workspace.generation,
                {
                    "action": action,
                    "template": workspace.template,
                    "runtime": workspace.runtime,
                    # The requests this cycle answers (all up to this seq): shows the coalescing.
                    "seq": workspace.requested_seq,
                    # A create served by a warm pool: where the instance came from.
                    **(
                        {"claimed_from_pool": workspace.template} if workspace.claim_pending else {}
                    ),
                },
                workspace=workspace,
            )
    return CycleStart(workspace, workspace.generation, workspace.requested_seq, token)


def record_backend_facts(
    workspace_id: UUID,
    generation: int,
    *,
    is_running: bool,
    backend_state: dict[str, Any],
    started: bool = False,
    handled_seq: int | None = None,
    config_populated: bool = False,
) -> bool:
    """Make the row say what the backend just said. Raises ``LeaseLost`` if overtaken.
    ``config_populated``: the cycle populated the config volume for the first time.

    True when the cycle answered every request (``handled_seq`` given and no newer one came):
    the lifecycle then need not read the row again to learn that nothing is left to do."""
    now = timezone.now()
    fields: dict[str, Any] = {
        "is_running": is_running,
        "backend_state": backend_state,
        "updated_at": now,
    }
    if started:
        fields["last_started_at"] = now
    if config_populated:
        fields["config_populated_at"] = now
    if handled_seq is not None:
        fields["handled_seq"] = handled_seq
    # The table's CHECK forbids online/degraded without a running instance: a cycle that saw the
    # instance stop must not leave the row claiming it is online.
    not_in = () if is_running else (S.ONLINE, S.DEGRADED)
    fenced = _fenced(workspace_id, generation).exclude(status__in=not_in)
    # Every request bumps requested_seq: a row still at the cycle's seq asks for nothing more.
    # A newer request (or a lost lease) takes a second UPDATE, which writes or raises.
    if handled_seq is not None and fenced.filter(requested_seq=handled_seq).update(**fields):
        return True
    if not fenced.update(**fields):
        raise LeaseLost(f"workspace {workspace_id} moved past generation {generation}")
    return False


def _replace_agent_token(workspace_id: UUID, generation: int) -> str:
    """The workspace's one agent token, now of ``generation``, in the caller's transaction, which
    holds the row lock: older cycles' tokens stop working. Returns the raw token."""
    raw = secrets.token_urlsafe(32)
    # One statement: inserted, or the workspace's token (of any generation) replaced in place.
    AgentToken.objects.bulk_create(
        [
            AgentToken(
                workspace_id=workspace_id, generation=generation, token_hash=token_digest(raw)
            )
        ],
        update_conflicts=True,
        unique_fields=["workspace"],
        update_fields=["generation", "token_hash", "created_at"],
    )
    return raw


def issue_agent_token(workspace_id: UUID, generation: int) -> str:
    """Replace the agent token of the current ``generation`` with a new one, under the row lock
    (a start cycle's own token comes from ``begin_cycle``); older cycles' tokens stop working."""
    with transaction.atomic():
        # The row lock orders this against a newer cycle's bump and its own token.
        locked = (
            Workspace.objects.select_for_update()
            .filter(id=workspace_id)
            .values_list("generation", flat=True)
            .first()
        )
        if locked != generation:
            raise LeaseLost(f"workspace {workspace_id} moved past generation {generation}")
        return _replace_agent_token(workspace_id, generation)


def complete_stop(
    workspace_id: UUID, generation: int, seq: int, backend_state: dict[str, Any]
) -> bool:
    with transaction.atomic():
        # Why the stop was asked for when a policy asked (the idle sweep): the event says so.
        reason = dict(_locked(workspace_id).stop_reason or {})
        changed = transition(
            workspace_id,
            S.STOPPED,
            expect_generation=generation,
            is_running=False,
            backend_state=backend_state,
            handled_seq=seq,
            stop_reason={},
        )
        if changed:
            AgentToken.objects.filter(workspace_id=workspace_id).delete()
            source = EventSource(reason.pop("source", EventSource.LIFECYCLE.value))
            record_event(workspace_id, EventType.STOPPED, source, generation, reason or None)
    return changed


def complete_remove(workspace_id: UUID, generation: int) -> bool:
    with transaction.atomic():
        changed = transition(
            workspace_id,
            S.REMOVED,
            expect_generation=generation,
            is_running=False,
            backend_state={},
            env={},  # secrets do not outlive the workspace
            handled_seq=F("requested_seq"),
        )
        if changed:
            AgentToken.objects.filter(workspace_id=workspace_id).delete()
            record_event(workspace_id, EventType.REMOVED, EventSource.LIFECYCLE, generation)
    return changed


def fail_cycle(
    workspace_id: UUID,
    generation: int,
    *,
    source: EventSource,
    message: str,
    seq: int | None = None,
    is_running: bool | None = None,
    payload: dict[str, Any] | None = None,
) -> bool:
    """Mark the cycle failed with one ``WORKSPACE_PROVISION_FAILED`` event; ``source`` says why.
    With nothing running (``is_running=False``) the cycle's agent token goes too: no agent
    holds it, and none ever may."""
    fields: dict[str, Any] = {"last_error": message}
    if seq is not None:
        fields["handled_seq"] = seq
    if is_running is not None:
        fields["is_running"] = is_running
    with transaction.atomic():
        changed = transition(workspace_id, S.FAILED, expect_generation=generation, **fields)
        if changed and is_running is False:
            AgentToken.objects.filter(workspace_id=workspace_id, generation=generation).delete()
        if changed:
            record_event(
                workspace_id,
                EventType.PROVISION_FAILED,
                source,
                generation,
                {"message": message, **(payload or {})},
            )
    if changed:
        logger.warning("workspace %s failed (%s): %s", workspace_id, source.value, message)
    return changed


def fail_stuck_provisioning(
    workspace_id: UUID,
    *,
    generation: int,
    started_at: datetime,
    timeout_secs: int,
    template: str,
    runtime: str,
) -> bool:
    """The stuck-provisioning sweep's flip: ``provisioning`` -> ``failed``, by compare-and-set.

    The UPDATE matches only while the row is still in the cycle the sweep read: status
    ``provisioning``, the same ``generation`` and the same ``provisioning_started_at`` (hence the
    same deadline). An agent that registered, a new cycle or a stop/delete request in between
    makes it match nothing, and the row is left alone (returns False).

    The flip runs outside the gate, so it must not touch the backend. It records the intent
    "stopped" (``desired_state`` + ``requested_seq``) and enqueues a converge: the lifecycle then
    stops whatever is left under the gate and keeps the row ``failed`` (``lifecycle.Action.REAP``);
    the redrive sweep re-enqueues it if that message is ever lost. The failure is final until a
    person asks again: a restart that was still queued behind the stuck cycle is superseded, so a
    cycle that never finishes cannot be retried into a loop. The generation is not bumped (only
    cycles do that, under the gate): a stuck holder that is still running sees ``failed`` with
    the intent pending when it re-reads the row, and reaps under the gate it already holds.
    """
    message = f"provisioning did not finish within {timeout_secs} s; the sweep marked it failed"
    with transaction.atomic():
        changed = transition(
            workspace_id,
            S.FAILED,
            expect_generation=generation,
            expect_status=S.PROVISIONING,
            when=Q(provisioning_started_at=started_at),
            last_error=message,
            desired_state=DesiredState.STOPPED,
            requested_seq=F("requested_seq") + 1,
        )
        if changed:
            record_event(
                workspace_id,
                EventType.PROVISION_FAILED,
                EventSource.PROVISION_TIMEOUT_SWEEP,
                generation,
                {
                    "message": message,
                    "runtime": runtime,
                    "template": template,
                    "timeout_secs": timeout_secs,
                    "provisioning_started_at": started_at.isoformat(),
                },
            )
            _enqueue_converge(workspace_id)
    if changed:
        logger.warning(
            "workspace %s failed (%s): no registration within %s s (template %s, runtime %s)",
            workspace_id,
            EventSource.PROVISION_TIMEOUT_SWEEP.value,
            timeout_secs,
            template,
            runtime,
        )
    return changed


def begin_reap(
    workspace_id: UUID, *, still_owner: Callable[[], bool] | None = None
) -> CycleStart | None:
    """Begin the cycle that stops what a failed workspace left running, keeping it ``failed``.

    Only while the row is still ``failed`` with the intent "stopped" pending (what the sweep's
    flip records); a start, stop or delete request in between wins: ``IntentChanged``, and the
    lifecycle plans again. Bumps the generation like every cycle, so a holder of the stuck cycle
    whose lease expired can no longer write. ``still_owner`` is checked under the row lock, as in
    ``begin_cycle``; raises ``LeaseLost`` when it fails.
    """
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if not workspace.has_pending_intent:
            return None
        if workspace.status != S.FAILED or workspace.desired_state != DesiredState.STOPPED:
            raise IntentChanged(f"workspace {workspace_id} no longer asks to stop what failed")
        if still_owner is not None and not still_owner():
            raise LeaseLost(f"the gate of workspace {workspace_id} is no longer ours")
        if not transition(
            workspace_id,
            S.FAILED,
            expect_generation=workspace.generation,
            expect_status=S.FAILED,
            generation=workspace.generation + 1,
        ):
            return None
        workspace.refresh_from_db()
    return CycleStart(workspace, workspace.generation, workspace.requested_seq)


def record_config_recovered(
    workspace_id: UUID, generation: int, *, template: str, fallback: bool
) -> None:
    record_event(
        workspace_id,
        EventType.CONFIG_RECOVERED,
        EventSource.LIFECYCLE,
        generation,
        {"template": template, "fallback": fallback},
    )


def record_error(workspace_id: UUID, generation: int, message: str) -> None:
    """Note a problem (e.g. a removal to be retried) without changing the status."""
    _fenced(workspace_id, generation).update(last_error=message, updated_at=timezone.now())
