"""Every write to a workspace, and every status change, goes through this module.

Two kinds of writes:

* **Requests** (API, admin, ``manage.py workspace``): record the intent (``desired_state`` and
  ``requested_seq``) in one transaction and enqueue a converge task with ``delay_on_commit``.
  They never touch the backend and never wait for the gate.
* **Cycle writes** (the lifecycle, under the gate): fenced by ``generation``. A cycle bumps the
  generation when it begins; every later write of that cycle is ``UPDATE ... WHERE id = %s AND
  generation = %s``, so a holder whose lease expired and was overtaken changes nothing.

Status changes go through ``transition``, which turns the transition table into the ``WHERE
status IN (...)`` of the same UPDATE: the check happens at the moment of the write.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from workspaces.models import AgentToken, Workspace, WorkspaceEvent, event_payload
from workspaces.status import (
    DesiredState,
    EventSource,
    EventType,
    WorkspaceStatus,
    allowed_sources,
)

if TYPE_CHECKING:
    from provisioning.manifests import Template

logger = logging.getLogger(__name__)
S = WorkspaceStatus

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ENV_VARS = 200
MAX_ENV_VALUE_BYTES = 32 * 1024


class ServiceError(Exception):
    """Base of the errors a caller can show to a person."""


class InvalidInput(ServiceError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TransitionNotAllowed(ServiceError):
    """The workspace's current status forbids the request (HTTP 409)."""


class AgentAuthError(ServiceError):
    """The agent's bearer token is unknown, for another workspace, or of an older cycle."""


class LeaseLost(ServiceError):
    """A fenced write matched no row: a newer cycle owns the workspace now."""


# --- validation shared by the API, the admin and manage.py ---------------------------------------
def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            "name",
            "must be 1-63 characters of lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    return name


def validate_env(env: Any) -> dict[str, str]:
    from provisioning.manifests import RESERVED_ENV

    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidInput("env", "must be an object mapping variable names to string values")
    if len(env) > MAX_ENV_VARS:
        raise InvalidInput("env", f"must have at most {MAX_ENV_VARS} variables")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise InvalidInput("env", f"{key!r} is not a valid variable name")
        if key in RESERVED_ENV:
            raise InvalidInput("env", f"{key} is set by the platform and cannot be given")
        if not isinstance(value, str):
            raise InvalidInput("env", f"the value of {key} must be a string")
        if len(value.encode()) > MAX_ENV_VALUE_BYTES:
            raise InvalidInput(
                "env", f"the value of {key} is longer than {MAX_ENV_VALUE_BYTES} bytes"
            )
    return dict(env)


def _enqueue_converge(workspace_id: UUID) -> None:
    from provisioning.tasks import converge_workspace

    # After commit: a worker must never pick up a task whose row it cannot see yet.
    converge_workspace.delay_on_commit(str(workspace_id))  # type: ignore[attr-defined]


def record_event(
    workspace_id: UUID,
    type: EventType,
    source: EventSource,
    generation: int,
    payload: dict[str, Any] | None = None,
) -> WorkspaceEvent:
    event = WorkspaceEvent.objects.create(
        workspace_id=workspace_id,
        type=type,
        source=source,
        generation=generation,
        payload=payload or {},
    )
    logger.info(
        "workspace %s event %s source=%s generation=%s",
        workspace_id,
        type.value,
        source.value,
        generation,
    )
    # Live subscribers hear of the event only once it is committed: a stream must never show an
    # event that a rollback then takes back, and a client that resumes from its id must find it.
    transaction.on_commit(lambda: _publish(event.pk), robust=True)
    return event


def _publish(event_id: int) -> None:
    from workspaces import live_events

    live_events.publish(event_id)


def transition(
    workspace_id: UUID,
    to: WorkspaceStatus,
    *,
    expect_generation: int | None = None,
    expect_status: WorkspaceStatus | None = None,
    when: Q | None = None,
    **fields: Any,
) -> bool:
    """Move the workspace to ``to`` if its status allows it and, when given, only if its
    generation is still ``expect_generation``, its status is exactly ``expect_status`` and the
    row matches ``when`` (e.g. the heartbeat or the start time a sweep saw). Returns whether the
    row changed."""
    sources = allowed_sources(to)
    if expect_status is not None:
        if expect_status not in sources:
            raise ValueError(f"{expect_status} -> {to} is not in the transition table")
        sources = frozenset({expect_status})
    rows = Workspace.objects.filter(id=workspace_id, status__in=sources)
    if expect_generation is not None:
        rows = rows.filter(generation=expect_generation)
    if when is not None:
        rows = rows.filter(when)
    return rows.update(status=to, updated_at=timezone.now(), **fields) == 1


# --- requests ------------------------------------------------------------------------------------
def _template_for(template: Any) -> Template:
    from provisioning.manifests import templates

    manifest = templates().get(template) if isinstance(template, str) else None
    if manifest is None:
        raise InvalidInput("template", f"unknown template {template!r}")
    return manifest


def _insert_workspace(
    *,
    owner: User,
    name: str,
    manifest: Template,
    env: dict[str, str],
    backend: str,
    parent: Workspace | None = None,
) -> Workspace:
    """Insert one workspace asking to run and enqueue its converge after the commit."""
    try:
        # A savepoint, so a name clash surfaces as a clean 400 inside a caller's transaction.
        with transaction.atomic():
            workspace = Workspace.objects.create(
                owner=owner,
                name=name,
                template=manifest.name,
                runtime=manifest.runtime,
                backend=backend,
                parent=parent,
                status=S.PROVISIONING,
                desired_state=DesiredState.RUNNING,
                env=env,
                requested_seq=1,
                handled_seq=0,
                provisioning_started_at=timezone.now(),
            )
    except IntegrityError as exc:
        if "workspace_name_unique_per_owner" in str(exc):
            raise InvalidInput("name", f"you already have a workspace named {name!r}") from None
        raise
    _enqueue_converge(workspace.id)
    return workspace


def create_workspace(
    *,
    owner: User,
    name: str,
    template: str,
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> Workspace:
    from provisioning.backends import default_backend_name

    validate_name(name)
    clean_env = validate_env(env)
    manifest = _template_for(template)
    if manifest.is_team:
        raise InvalidInput("template", f"{template!r} is a team template: use POST /api/teams/")
    with transaction.atomic():
        return _insert_workspace(
            owner=owner,
            name=name,
            manifest=manifest,
            env=clean_env,
            backend=backend or default_backend_name(),
        )


def team_member_names(team_name: str, members: tuple[str, ...]) -> list[str]:
    """``<team>-<member>``; a member template listed more than once is numbered
    (``<team>-<member>-1``, ``-2``, ...)."""
    counts = {member: members.count(member) for member in members}
    seen: dict[str, int] = {}
    names = []
    for member in members:
        seen[member] = seen.get(member, 0) + 1
        suffix = f"-{seen[member]}" if counts[member] > 1 else ""
        names.append(f"{team_name}-{member}{suffix}")
    return names


@dataclass(frozen=True)
class Team:
    parent: Workspace
    members: list[Workspace]


def create_team(
    *,
    owner: User,
    name: str,
    template: str,
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> Team:
    """Expand a team template into its parent workspace and one workspace per member template,
    all in one transaction. The parent runs the team template's own runtime like any workspace;
    every member gets the same env and is provisioned (and preflighted) on its own, so one
    member's failure shows on that member."""
    from provisioning.backends import default_backend_name
    from provisioning.manifests import templates

    validate_name(name)
    clean_env = validate_env(env)
    manifest = _template_for(template)
    if not manifest.is_team:
        raise InvalidInput("template", f"{template!r} is not a team template (it lists no members)")
    member_names = team_member_names(name, manifest.members)
    for member_name in member_names:
        if not NAME_RE.match(member_name):
            raise InvalidInput(
                "name",
                f"the member name {member_name!r} would be invalid: use a shorter team name",
            )
    template_set = templates()
    missing = [member for member in manifest.members if template_set.get(member) is None]
    if missing:
        raise InvalidInput("template", f"member templates not found: {', '.join(missing)}")
    member_manifests = [template_set.templates[member] for member in manifest.members]
    backend_name = backend or default_backend_name()
    with transaction.atomic():
        parent = _insert_workspace(
            owner=owner, name=name, manifest=manifest, env=clean_env, backend=backend_name
        )
        members = [
            _insert_workspace(
                owner=owner,
                name=member_name,
                manifest=member_manifest,
                env=clean_env,
                backend=backend_name,
                parent=parent,
            )
            for member_name, member_manifest in zip(member_names, member_manifests, strict=True)
        ]
    logger.info("team %s (%s) created with %d members", name, parent.id, len(members))
    return Team(parent, members)


def _locked(workspace_id: UUID) -> Workspace:
    return Workspace.objects.select_for_update().get(id=workspace_id)


def request_start(workspace_id: UUID) -> Workspace:
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status in (S.REMOVING, S.REMOVED):
            raise TransitionNotAllowed(f"workspace is {workspace.status}; it cannot be started")
        if workspace.desired_state == DesiredState.RUNNING and workspace.status in (
            S.PROVISIONING,
            S.ONLINE,
            S.DEGRADED,
        ):
            raise TransitionNotAllowed(
                f"workspace is already {workspace.status}; use restart to start it again"
            )
        Workspace.objects.filter(id=workspace_id).update(
            desired_state=DesiredState.RUNNING,
            requested_seq=F("requested_seq") + 1,
            updated_at=timezone.now(),
        )
        _enqueue_converge(workspace_id)
    workspace.refresh_from_db()
    return workspace


def request_stop(workspace_id: UUID) -> Workspace:
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status == S.REMOVED:
            raise TransitionNotAllowed(f"workspace is {workspace.status}; it cannot be stopped")
        # Accepted with nothing to do: a workspace being removed is stopped by its removal.
        nothing_to_do = workspace.status == S.REMOVING or (
            workspace.status == S.STOPPED and workspace.desired_state == DesiredState.STOPPED
        )
        if not nothing_to_do:
            Workspace.objects.filter(id=workspace_id).update(
                desired_state=DesiredState.STOPPED,
                requested_seq=F("requested_seq") + 1,
                updated_at=timezone.now(),
            )
            # Say "stopping" at once; the cycle that does the work bumps the generation, so a
            # start cycle still in flight cannot write "online" over it (stopping -> online is
            # not in the table).
            transition(workspace_id, S.STOPPING)
            _enqueue_converge(workspace_id)
    workspace.refresh_from_db()
    return workspace


def request_restart(workspace_id: UUID) -> Workspace:
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status in (S.REMOVING, S.REMOVED):
            raise TransitionNotAllowed(f"workspace is {workspace.status}; it cannot be restarted")
        # Coalescing: every restart bumps requested_seq; the next cycle handles all of them.
        Workspace.objects.filter(id=workspace_id).update(
            desired_state=DesiredState.RUNNING,
            requested_seq=F("requested_seq") + 1,
            updated_at=timezone.now(),
        )
        _enqueue_converge(workspace_id)
    workspace.refresh_from_db()
    return workspace


def request_remove(workspace_id: UUID) -> Workspace:
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status != S.REMOVED:
            Workspace.objects.filter(id=workspace_id).update(
                desired_state=DesiredState.REMOVED,
                requested_seq=F("requested_seq") + 1,
                updated_at=timezone.now(),
            )
            transition(workspace_id, S.REMOVING)
            _enqueue_converge(workspace_id)
    workspace.refresh_from_db()
    return workspace


# --- cycle writes (called by provisioning.lifecycle under the gate) -------------------------------
@dataclass(frozen=True)
class CycleStart:
    workspace: Workspace  # the row as it is after the generation bump
    generation: int
    seq: int  # requested_seq when the cycle began; handled_seq becomes this on completion


def begin_cycle(
    workspace_id: UUID,
    target: WorkspaceStatus,
    *,
    action: str,
    still_owner: Callable[[], bool] | None = None,
) -> CycleStart | None:
    """Bump the generation and move to ``target``; None if the status no longer allows it.

    ``still_owner`` (the gate's lease check) runs while the row is locked. A holder that passes
    it owned the gate at that moment, so anyone who takes the gate later blocks on this row lock
    until the bump commits and then bumps past it: a holder paused beyond its lease can never
    begin a cycle over a newer holder's. Raises ``LeaseLost`` when the check fails.
    """
    now = timezone.now()
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status not in allowed_sources(target):
            return None
        if still_owner is not None and not still_owner():
            raise LeaseLost(f"the gate of workspace {workspace_id} is no longer ours")
        fields: dict[str, Any] = {"generation": workspace.generation + 1}
        if target == S.PROVISIONING:
            fields.update(provisioning_started_at=now, last_error="")
        if not transition(workspace_id, target, expect_generation=workspace.generation, **fields):
            return None
        workspace.refresh_from_db()
        if target == S.PROVISIONING:
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
                },
            )
    return CycleStart(workspace, workspace.generation, workspace.requested_seq)


def _fenced(workspace_id: UUID, generation: int) -> Any:
    return Workspace.objects.filter(id=workspace_id, generation=generation)


def record_backend_facts(
    workspace_id: UUID,
    generation: int,
    *,
    is_running: bool,
    backend_state: dict[str, Any],
    started: bool = False,
    handled_seq: int | None = None,
    config_populated: bool = False,
) -> None:
    """Make the row say what the backend just said. Raises ``LeaseLost`` if overtaken."""
    now = timezone.now()
    fields: dict[str, Any] = {
        "is_running": is_running,
        "backend_state": backend_state,
        "updated_at": now,
    }
    if started:
        fields["last_started_at"] = now
    if handled_seq is not None:
        fields["handled_seq"] = handled_seq
    rows = _fenced(workspace_id, generation)
    if not is_running:
        # The table's CHECK forbids online/degraded without a running instance: a cycle that saw
        # the instance stop must not leave the row claiming it is online.
        rows = rows.exclude(status__in=(S.ONLINE, S.DEGRADED))
    if rows.update(**fields) != 1:
        raise LeaseLost(f"workspace {workspace_id} moved past generation {generation}")


def issue_agent_token(workspace_id: UUID, generation: int) -> str:
    """Create the one agent token of this cycle; older cycles' tokens stop working."""
    raw = secrets.token_urlsafe(32)
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.generation != generation:
            raise LeaseLost(f"workspace {workspace_id} moved past generation {generation}")
        AgentToken.objects.filter(workspace_id=workspace_id).delete()
        AgentToken.objects.create(
            workspace_id=workspace_id, generation=generation, token_hash=hash_token(raw)
        )
    return raw


def complete_stop(
    workspace_id: UUID, generation: int, seq: int, backend_state: dict[str, Any]
) -> bool:
    with transaction.atomic():
        changed = transition(
            workspace_id,
            S.STOPPED,
            expect_generation=generation,
            is_running=False,
            backend_state=backend_state,
            handled_seq=seq,
        )
        if changed:
            AgentToken.objects.filter(workspace_id=workspace_id).delete()
            record_event(workspace_id, EventType.STOPPED, EventSource.LIFECYCLE, generation)
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
    """Mark the cycle failed with one ``WORKSPACE_PROVISION_FAILED`` event; ``source`` says why."""
    fields: dict[str, Any] = {"last_error": message}
    if seq is not None:
        fields["handled_seq"] = seq
    if is_running is not None:
        fields["is_running"] = is_running
    with transaction.atomic():
        changed = transition(workspace_id, S.FAILED, expect_generation=generation, **fields)
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


def begin_reap(workspace_id: UUID) -> CycleStart | None:
    """Begin the cycle that stops what a failed workspace left running, keeping it ``failed``.

    Only while the row is still ``failed`` with the intent "stopped" pending (what the sweep's
    flip records); a start, stop or delete request in between wins and this returns None. Bumps
    the generation like every cycle, so a holder of the stuck cycle whose lease expired can no
    longer write.
    """
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if (
            workspace.status != S.FAILED
            or workspace.desired_state != DesiredState.STOPPED
            or not workspace.has_pending_intent
        ):
            return None
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


def record_config_populated(workspace_id: UUID, generation: int) -> None:
    _fenced(workspace_id, generation).update(config_populated_at=timezone.now())


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


# --- the agent -------------------------------------------------------------------------------
def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def authenticate_agent(raw_token: str) -> AgentToken | None:
    return (
        AgentToken.objects.select_related("workspace")
        .filter(token_hash=hash_token(raw_token))
        .first()
    )


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


def register_agent(token: AgentToken, workspace_id: UUID) -> Workspace:
    """The agent of the current cycle says the workspace is up: ``provisioning`` -> ``online``."""
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
        record_event(workspace_id, EventType.ONLINE, EventSource.AGENT, token.generation)
    workspace.refresh_from_db()
    return workspace


def record_heartbeat(token: AgentToken, workspace_id: UUID, *, healthy: bool = True) -> Workspace:
    now = timezone.now()
    with transaction.atomic():
        workspace = _agent_workspace(token, workspace_id)
        _fenced(workspace_id, token.generation).update(last_heartbeat_at=now)
        target = S.ONLINE if healthy else S.DEGRADED
        if workspace.status in (S.ONLINE, S.DEGRADED, S.OFFLINE) and workspace.status != target:
            last_started: datetime | None = workspace.last_started_at or now
            if transition(
                workspace_id,
                target,
                expect_generation=token.generation,
                is_running=True,
                last_started_at=last_started,
            ):
                record_event(
                    workspace_id,
                    EventType.ONLINE if healthy else EventType.DEGRADED,
                    EventSource.AGENT,
                    token.generation,
                    event_payload(previous=workspace.status),
                )
    workspace.refresh_from_db()
    return workspace


# --- reconciliation and liveness -----------------------------------------------------------------
# The reconciler calls these under the workspace's gate, fenced by the generation it read there:
# no cycle runs meanwhile, and if its lease expired and a cycle took over, nothing is written.
# None of them bumps the generation: a repair is not a cycle, so the current agent's token stays
# valid and a heartbeat of an instance that turns out to be alive brings the row back online.
def record_instance_gone(
    workspace_id: UUID, generation: int, *, exit_code: int | None = None, detail: str = ""
) -> WorkspaceStatus | None:
    """The backend says the instance no longer runs while the row says it does (it died, or was
    stopped behind the platform's back). Returns the status written, or None when the row moved
    on and there was nothing to repair.

    ``online``/``degraded``/``offline`` become ``offline``, or ``failed`` when the backend knows
    a non-zero exit code; a ``provisioning`` workspace whose instance died before its agent
    registered fails; a ``failed`` one only stops claiming to run.
    """
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.generation != generation or not workspace.is_running:
            return None
        previous = WorkspaceStatus(workspace.status)
        facts = event_payload(
            previous=previous.value,
            exit_code=exit_code,
            detail=detail or None,
            reason="instance_gone",
        )
        crashed = exit_code is not None and exit_code != 0
        if previous == S.FAILED:
            target, event_type = S.FAILED, EventType.STOPPED
            fields: dict[str, Any] = {"is_running": False}
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
