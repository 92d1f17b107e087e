"""The agent's writes: registration and heartbeats, authenticated by a token of one
workspace and one generation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from workspaces import metrics, sql
from workspaces.crypto import token_digest
from workspaces.manifests import templates
from workspaces.models import AgentToken, Workspace, WorkspaceEvent, event_payload
from workspaces.services.common import (
    AgentAuthError,
    TransitionNotAllowed,
    _fenced,
    _locked,
    record_event,
    transition,
)
from workspaces.status import (
    EventSource,
    EventType,
    WorkspaceStatus,
    allowed_sources,
)

S = WorkspaceStatus


# --- the agent -------------------------------------------------------------------------------
def authenticate_agent(raw_token: str) -> AgentToken | None:
    try:
        return AgentToken.objects.get(token_hash=token_digest(raw_token))  # a unique digest
    except AgentToken.DoesNotExist:
        return None


def _agent_workspace(token: AgentToken, workspace_id: UUID) -> Workspace:
    if token.workspace_id != workspace_id:
        raise AgentAuthError("this token does not belong to that workspace")
    workspace = _locked(workspace_id)
    if workspace.status == S.REMOVED:
        raise AgentAuthError("the workspace has been removed")
    if workspace.generation != token.generation:
        raise AgentAuthError(
            f"token of cycle {token.generation} is stale; the workspace is at cycle "
            f"{workspace.generation}"
        )
    return workspace


def _record_config_copy(workspace: Workspace, generation: int) -> None:
    """The agent found its config volume freshly filled from the template's config image. After
    an earlier registration that is a recovery (the volume had been emptied); before any, it is
    the first population (recorded by the cycle), or one whose agent never got to report it."""
    if generation <= 1:
        return  # the first cycle: nothing registered before it
    registered_before = WorkspaceEvent.objects.filter(
        workspace_id=workspace.id, type=EventType.ONLINE, generation__lt=generation
    ).exists()
    if not registered_before:
        return
    source = templates().for_launch(workspace.template, workspace.runtime)
    name = source.name if source is not None else workspace.template
    record_event(
        workspace.id,
        EventType.CONFIG_RECOVERED,
        EventSource.AGENT,
        generation,
        {"template": name, "fallback": name != workspace.template},
    )


def register_agent(
    token: AgentToken, workspace_id: UUID, *, config_copied: bool = False
) -> Workspace:
    """The agent of the current cycle says the workspace is up: ``provisioning`` -> ``online``.
    ``config_copied``: its config volume was filled from the template since its last report."""
    now = timezone.now()
    with transaction.atomic():
        workspace = _agent_workspace(token, workspace_id)
        if workspace.status == S.ONLINE:
            return workspace  # a retried registration: nothing to do
        if workspace.status not in allowed_sources(S.ONLINE):
            raise TransitionNotAllowed(f"workspace is {workspace.status}; registration refused")
        # online always comes with is_running and last_started_at (a CHECK constraint agrees).
        changed = transition(
            workspace_id,
            S.ONLINE,
            expect_generation=token.generation,
            is_running=True,
            last_started_at=workspace.last_started_at if workspace.is_running else now,
            last_heartbeat_at=now,
            last_error="",
        )
        if not changed:
            raise AgentAuthError("the workspace moved to a newer cycle")
        if config_copied:
            _record_config_copy(workspace, token.generation)
        record_event(
            workspace_id,
            EventType.ONLINE,
            EventSource.AGENT,
            token.generation,
            workspace=workspace,
        )
        if workspace.status == S.PROVISIONING and workspace.provisioning_started_at is not None:
            seconds = (now - workspace.provisioning_started_at).total_seconds()
            transaction.on_commit(
                lambda: metrics.PROVISION_TO_ONLINE.labels(
                    runtime=workspace.runtime, backend=workspace.backend
                ).observe(seconds)
            )
        # The row is locked: what the UPDATE wrote is known without reading it back.
        workspace.last_started_at = workspace.last_started_at if workspace.is_running else now
        workspace.status_changed_at = workspace.updated_at = now
        workspace.status, workspace.is_running = S.ONLINE, True
        workspace.last_heartbeat_at, workspace.last_error = now, ""
    return workspace


@dataclass(frozen=True)
class HeartbeatAnswer:
    """What a heartbeat answers: the workspace's status and generation once it was recorded."""

    id: UUID
    status: str
    generation: int


def beat(
    token_hash: str, workspace_id: UUID, *, healthy: bool = True, active: bool = False
) -> HeartbeatAnswer | None:
    """Almost every heartbeat, in one statement that is its authentication too: the token (by
    its digest) of the workspace's current cycle, on a workspace already at the status the beat
    confirms; only the clocks move. None when anything else holds (an unknown, stale or foreign
    token, a status to change, a removed workspace): ``record_heartbeat`` decides and says why."""
    now = timezone.now()
    target = S.ONLINE if healthy else S.DEGRADED
    generation = sql.beat(token_hash, workspace_id, target.value, now, active)
    return None if generation is None else HeartbeatAnswer(workspace_id, target, generation)


def record_heartbeat(
    token: AgentToken, workspace_id: UUID, *, healthy: bool = True, active: bool = False
) -> HeartbeatAnswer:
    """``active``: the agent saw activity in the workspace since its previous heartbeat; the
    idle clock restarts (in the heartbeat's own UPDATE: no extra write).

    Almost every beat changes nothing but the clocks: one UPDATE fenced on the token's
    generation and on the status the beat confirms records it, with no lock held across round
    trips. Anything else (a status to change, a stale token, a removed workspace) takes the locked
    path, which decides and says why."""
    if token.workspace_id == workspace_id and (
        answer := beat(token.token_hash, workspace_id, healthy=healthy, active=active)
    ):
        return answer
    now = timezone.now()
    seen: dict[str, datetime] = {"last_heartbeat_at": now}
    if active:
        seen["last_activity_at"] = now
    target = S.ONLINE if healthy else S.DEGRADED
    with transaction.atomic():
        workspace = _agent_workspace(token, workspace_id)
        _fenced(workspace_id, token.generation).update(**seen)
        status = workspace.status
        if workspace.status in (S.ONLINE, S.DEGRADED, S.OFFLINE) and workspace.status != target:
            last_started: datetime | None = workspace.last_started_at or now
            if transition(
                workspace_id,
                target,
                expect_generation=token.generation,
                is_running=True,
                last_started_at=last_started,
            ):
                status = target
                record_event(
                    workspace_id,
                    EventType.ONLINE if healthy else EventType.DEGRADED,
                    EventSource.AGENT,
                    token.generation,
                    event_payload(previous=workspace.status),
                )
    # Read under the row lock (the generation is the token's: _agent_workspace checked it).
    return HeartbeatAnswer(workspace_id, status, token.generation)
