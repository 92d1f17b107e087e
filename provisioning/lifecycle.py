"""The lifecycle: converge a workspace's backend towards what was asked, one cycle at a time.

``converge`` takes the workspace's gate (or raises ``GateBusy`` at once), reads the intent the
request services recorded, and runs the cycle it calls for: start (provision / start / restart),
stop or remove. Requests that arrive while a cycle runs bump ``requested_seq``; after the cycle
the loop reads the row again (unless the cycle's last write saw none), so any number of them
collapse into at most one more cycle.

Every write goes through ``workspaces.services`` fenced by the generation the cycle began with.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.utils import timezone

from provisioning import gate
from provisioning.backends import backend_for
from provisioning.backends.base import (
    BackendError,
    BackendUnavailable,
    ConfigState,
    LaunchSpec,
    SandboxUnavailable,
    TransientBackendError,
    WorkspaceBackend,
)
from workspaces import metrics, selectors, services
from workspaces.crypto import EnvDecryptionError
from workspaces.manifests import Template, templates
from workspaces.models import Workspace
from workspaces.status import DesiredState, EventSource, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus
T = TypeVar("T")
MAX_CYCLES_PER_HOLD = 3


class Action(enum.StrEnum):
    PROVISION = "provision"
    START = "start"
    RESTART = "restart"
    # A create claimed a warm pool's member: hand its waiting agent the workspace.
    CLAIM = "claim"
    STOP = "stop"
    REMOVE = "remove"
    # Stop what a failed workspace left running and keep it failed (after the sweep's flip).
    REAP = "reap"


class Ran(enum.Enum):
    """What a cycle did, for the loop in ``converge``."""

    NOTHING = "nothing"  # not begun: the row no longer allows it
    DONE = "done"  # ran: read the row again for what is asked next
    SETTLED = "settled"  # ran, and its last write found nothing newer asked: the hold ends


def plan(workspace: Workspace) -> Action | None:
    """The cycle the workspace needs now, or None when the backend already matches the intent."""
    if workspace.status == S.REMOVED:
        return None
    if workspace.desired_state == DesiredState.REMOVED:
        return Action.REMOVE
    if not workspace.has_pending_intent:
        return None
    if workspace.desired_state == DesiredState.STOPPED:
        # A failed row with "stopped" pending is what the stuck-provisioning sweep leaves: stop
        # what is left, but keep the failure visible. A person's stop goes through `stopping`.
        return Action.REAP if workspace.status == S.FAILED else Action.STOP
    if workspace.claim_pending:
        return Action.CLAIM
    if workspace.generation == 0:
        return Action.PROVISION
    if workspace.is_running or workspace.status in (S.ONLINE, S.DEGRADED, S.PROVISIONING):
        return Action.RESTART
    return Action.START


def converge(
    workspace_id: UUID, *, holder: str | None = None, final_attempt: bool = True
) -> list[str]:
    """Run the cycles the workspace needs, under its gate. Raises ``gate.GateBusy`` at once if
    another holder runs a cycle, or after a cycle found its lease lost; returns the actions run
    (empty when there was nothing to do)."""
    done: list[str] = []
    lost = False
    with gate.hold(workspace_id, holder) as lease:
        while len(done) < MAX_CYCLES_PER_HOLD:
            # What ``plan`` decides on (and the log names): each cycle locks and reads the whole
            # row itself when it begins.
            workspace = selectors.plan_row(workspace_id)
            if workspace is None:
                break
            action = plan(workspace)
            if action is None:
                break
            cycle = _CYCLES[action]
            began = time.monotonic()
            outcome = "error"
            try:
                ran = cycle(workspace, action, lease, final_attempt)
                outcome = "done"
            except services.IntentChanged as exc:
                # A request committed after the read above: plan again from the row as it is.
                # Each pass of this kind follows a newer committed request; nothing was written.
                logger.info("cycle %s for %s not begun: %s", action, workspace_id, exc)
                outcome = "replanned"
                continue
            except services.LeaseLost as exc:
                # A newer cycle took over (our lease expired): it owns the workspace now.
                logger.warning(
                    "cycle %s for %s/%s (%s) abandoned: %s",
                    action,
                    workspace.owner.username,
                    workspace.name,
                    workspace_id,
                    exc,
                )
                outcome = "abandoned"
                lost = True
                break
            finally:
                metrics.CYCLE_DURATION.labels(action=action.value, outcome=outcome).observe(
                    time.monotonic() - began
                )
            if ran is Ran.NOTHING:
                break
            done.append(action.value)
            if ran is Ran.SETTLED:
                break
    if lost:
        # Usually a newer holder runs the workspace now; but the lease may also have lapsed with
        # nobody else holding it, and then this intent would wait for the redrive sweep. Being
        # told "busy" makes the caller come back once, which is harmless either way.
        raise gate.GateBusy(str(workspace_id))
    return done


def launch_env(
    workspace: Workspace, env: dict[str, str], template: Template, generation: int
) -> dict[str, str]:
    launched = {
        # The platform's interval, derived from the liveness window; a template may set its own.
        "AGENT_HEARTBEAT_SECONDS": f"{settings.AGENT_HEARTBEAT_SECONDS:g}",
        **template.env,
        **env,
        "WORKSPACE_ID": str(workspace.id),
        "WORKSPACE_GENERATION": str(generation),
        "PLATFORM_URL": settings.PLATFORM_URL,
    }
    if template.app is not None and workspace.app_port is not None:
        # The agent starts the app (or serves its own page) on this port and registers only
        # once the health path answers.
        launched["WORKSPACE_APP_PORT"] = str(workspace.app_port)
        launched["WORKSPACE_APP_HEALTH_PATH"] = template.app.health_path
        if template.app.command:
            launched["WORKSPACE_APP_COMMAND"] = template.app.command
    return launched


# What a pool member learns only at its claim (its agent waits for them).
_CLAIM_ONLY_ENV = ("WORKSPACE_ID", "WORKSPACE_GENERATION")


def pool_member_env(workspace: Workspace, template: Template) -> dict[str, str]:
    """A warm pool member's launch env: the template's part alone. No identity, no token, no
    person's env: nothing a member holds is a secret until its claim hands them over."""
    env = launch_env(workspace, {}, template, 0)
    for key in _CLAIM_ONLY_ENV:
        env.pop(key, None)
    env["WORKSPACE_POOL"] = "1"
    return env


def missing_required_env(env: dict[str, str], template: Template) -> list[str]:
    return [name for name in template.required_env if not env.get(name)]


# Far below the shortest lease (GATE_LEASE_SECONDS is at least 3 s).
FRESH_CONFIRMATION_SECONDS = 0.5


def _confirmed(lease: gate.Lease, call: Callable[..., T], *args: Any) -> T:
    """Run one backend call between two lease confirmations.

    Before: a holder whose lease lapsed (paused, or a slow earlier step) must not touch the
    backend of a workspace that a newer holder may own. After: the call itself may have outlasted
    the lease (a stop's grace period, a slow engine); the holder learns it before it writes what
    the backend said or makes the next call. ``LeaseExpired`` is a ``LeaseLost``: the cycle ends.

    The previous call's confirmation after it stands for the one before, when it succeeded less
    than ``FRESH_CONFIRMATION_SECONDS`` ago and no backend call has begun since (a start's
    prepare, config and start follow one another at once). It renewed the lease to its full
    length, so no pause or slow step since can have outlasted it; anything slower, and any call
    after one that raised, confirms again.
    """
    lease.ensure(unless_within=FRESH_CONFIRMATION_SECONDS)
    lease.call_begins()
    result = call(*args)
    lease.ensure()
    return result


def _backend_failure(exc: BackendError) -> str:
    """The failure message: the backend's own, and for a transient error that it outlasted the
    task's retries (the cycle reaches here with one only on its final attempt)."""
    if isinstance(exc, TransientBackendError):
        return f"{exc} (a transient backend error, still failing on the final attempt)"
    return str(exc)


def _leftover_possible(workspace: Workspace) -> bool:
    return bool(workspace.is_running or workspace.backend_state or workspace.generation > 1)


def _fail(
    workspace: Workspace,
    generation: int,
    seq: int,
    *,
    source: EventSource,
    message: str,
    lease: gate.Lease,
    backend: WorkspaceBackend | None = None,
    payload: dict | None = None,
) -> None:
    """Fail the cycle; first stop whatever runs, so nothing runs that the database calls failed.
    A holder that lost its lease fails nothing (``LeaseExpired``): the newer holder decides."""
    is_running = False
    if backend is not None:
        grace = settings.STOP_GRACE_SECONDS
        try:
            state = _confirmed(lease, backend.stop, workspace.id, workspace.backend_state, grace)
            services.record_backend_facts(
                workspace.id, generation, is_running=False, backend_state=state
            )
        except BackendError as exc:
            try:
                status = _confirmed(lease, backend.status, workspace.id, workspace.backend_state)
                is_running = status.running
            except BackendError:
                is_running = workspace.is_running  # unknown: keep what we last knew
            message = f"{message} (stopping what was left also failed: {exc})"
    lease.ensure()  # also when no backend was called: the failure is the current holder's to write
    services.fail_cycle(
        workspace.id,
        generation,
        source=source,
        message=message,
        seq=seq,
        is_running=is_running,
        payload=payload,
    )


def _start_cycle(
    workspace: Workspace, action: Action, lease: gate.Lease, final_attempt: bool
) -> Ran:
    cycle = services.begin_cycle(
        workspace.id, S.PROVISIONING, action=action.value, still_owner=lease.confirm
    )
    if cycle is None:
        return Ran.NOTHING
    lease.set_generation(cycle.generation)
    workspace, generation, seq = cycle.workspace, cycle.generation, cycle.seq
    # A warm pool's member runs the template's part only; a claimed one (the row as locked when
    # this cycle began, which cleared the flag: a redelivered cycle starts cold) takes the rest.
    pooled, claimed = bool(workspace.pool), workspace.claim_pending

    def refuse(message: str, payload: dict[str, Any] | None = None) -> Ran:
        """Fail the cycle before any backend call (an instance that may run is stopped)."""
        _fail(
            workspace,
            generation,
            seq,
            lease=lease,
            source=EventSource.PREFLIGHT,
            message=message,
            backend=_select_quietly(workspace) if workspace.is_running else None,
            payload=payload,
        )
        return Ran.DONE

    template = templates().for_launch(workspace.template, workspace.runtime)
    if template is None:
        return refuse(
            f"template {workspace.template!r} no longer exists and there is no "
            f"{workspace.runtime}-default template to fall back to"
        )
    # The only place a workspace's env is decrypted: the cycle that launches its instance.
    try:
        env = {} if pooled else workspace.env.reveal()
    except EnvDecryptionError as exc:
        return refuse(str(exc))
    # Preflight: before any backend call, so a missing key fails in a second, not a timeout. A
    # member has no env to check: its claim checked the claimer's before taking it.
    missing = [] if pooled else missing_required_env(env, template)
    if missing:
        return refuse(
            f"missing required environment variables: {', '.join(missing)}",
            {"missing_env": missing, "template": template.name},
        )

    try:
        # It pings the backend, and checks that it can run the workspace's sandbox.
        backend = _confirmed(lease, partial(backend_for, launch=True), workspace)
    except SandboxUnavailable as exc:
        # A preflight failure like a missing variable: the template asks for what this
        # platform cannot give, and no retry changes that until an operator does.
        payload = {"sandbox": exc.sandbox, "backend": exc.backend}
        if exc.container_runtime:
            payload["container_runtime"] = exc.container_runtime
        return refuse(str(exc), payload)
    except BackendUnavailable as exc:
        _fail(
            workspace,
            generation,
            seq,
            lease=lease,
            source=EventSource.BACKEND,
            message=str(exc),
            payload={"backend": exc.backend},
        )
        return Ran.DONE

    ran = Ran.DONE  # what a failed cycle reports: the loop reads the row it wrote
    try:
        # The token (issued as the cycle began) comes before prepare: a backend whose instance's
        # environment is fixed when it is created (a Docker container) creates it there.
        token = cycle.token
        uid = None
        if services.uid_isolation_applies(backend.name):
            # Read with the row under its lock as the cycle began; a live workspace's uid never
            # changes. A row without one (created while isolation was off) is given one.
            uid = workspace.isolation_uid
            if uid is None:
                try:
                    uid = services.ensure_isolation_uid(workspace.id, generation)
                except services.IsolationRefused as exc:
                    raise BackendError(str(exc)) from exc
        spec = LaunchSpec(
            workspace.id,
            generation,
            template,
            pool_member_env(workspace, template)
            if pooled
            else {**launch_env(workspace, env, template, generation), "WORKSPACE_TOKEN": token},
            uid=uid,
            pooled=pooled,
            sandbox=workspace.sandbox,
        )
        state = dict(workspace.backend_state)
        if claimed and template.name == workspace.template:
            handed_over = _claim(backend, spec, state, lease, seq)
            if handed_over is not None:
                return handed_over
        if _leftover_possible(workspace):
            # Replace whatever runs (an earlier cycle's, or a killed worker's) before the new one.
            grace = settings.STOP_GRACE_SECONDS
            state = _confirmed(lease, backend.stop, workspace.id, state, grace)
            services.record_backend_facts(
                workspace.id, generation, is_running=False, backend_state=state
            )
        state = _confirmed(lease, backend.prepare, spec, state)
        populated = _ensure_config(backend, spec, state, workspace, lease)
        # The confirmation before start is the last moment to find out that a newer holder owns
        # the workspace before an instance runs; confirming also renews the lease.
        state = _confirmed(lease, backend.start, spec, state)
        settled = services.record_backend_facts(
            workspace.id,
            generation,
            is_running=True,
            backend_state=state,
            started=True,
            handled_seq=seq,
            config_populated=populated,
        )
        ran = Ran.SETTLED if settled else Ran.DONE
        if pooled:
            metrics.POOL_REFILL_SECONDS.labels(
                template=template.name, backend=backend.name
            ).observe(max(0.0, (timezone.now() - workspace.created_at).total_seconds()))
    except BackendError as exc:
        if isinstance(exc, TransientBackendError) and not final_attempt:
            raise  # the task retries with backoff; the next attempt is a new cycle
        _fail(
            workspace,
            generation,
            seq,
            lease=lease,
            source=EventSource.BACKEND,
            message=_backend_failure(exc),
            backend=backend,
            payload={"transient": isinstance(exc, TransientBackendError)},
        )
    except SoftTimeLimitExceeded:
        _fail(
            workspace,
            generation,
            seq,
            lease=lease,
            source=EventSource.LIFECYCLE,
            message=f"the {action.value} cycle exceeded {settings.CYCLE_SOFT_TIME_LIMIT_SECONDS} s",
            backend=backend,
        )
    return ran


def _claim(
    backend: WorkspaceBackend, spec: LaunchSpec, state: dict, lease: gate.Lease, seq: int
) -> Ran | None:
    """Hand the claimed member its workspace; None when it cannot take it (it died since it was
    ready): the caller then starts the workspace cold, replacing whatever the member left."""
    cycle = spec.workspace_id, spec.generation
    try:
        state = _confirmed(lease, backend.claim, spec, state)
    except BackendError as exc:
        logger.warning("pool member %s could not take its claim, starting cold: %s", cycle[0], exc)
        metrics.POOL_CLAIM_FALLBACKS.labels(template=spec.template.name, backend=backend.name).inc()
        return None
    settled = services.record_backend_facts(
        *cycle, is_running=True, backend_state=state, started=True, handled_seq=seq
    )
    return Ran.SETTLED if settled else Ran.DONE


def _select_quietly(workspace: Workspace) -> WorkspaceBackend | None:
    try:
        return backend_for(workspace)
    except BackendUnavailable:
        return None


def _ensure_config(
    backend: WorkspaceBackend,
    spec: LaunchSpec,
    state: dict,
    workspace: Workspace,
    lease: gate.Lease,
) -> bool:
    """Populate the config volume on first provision; recover it when a later start finds it
    empty. The source is the template the cycle resolved (``spec.template``): the workspace's
    own, or ``<runtime>-default`` when that is gone; with neither, the cycle failed before any
    backend call. True on a first provision: the start's facts record ``config_populated_at``
    in their UPDATE (a cycle that fails before that left a volume that counts as never
    populated, and the next first provision writes it again)."""
    first = workspace.config_populated_at is None
    if backend.config_in_image(spec):
        # The engine filled an empty volume from the template's config image when prepare
        # created the instance; the agent reports that copy at registration, where a copy after
        # an earlier registration is recorded as the recovery.
        return first
    # Never populated by a finished cycle: write it without reading it first (whatever an
    # interrupted earlier cycle left is overwritten; one engine round trip less per provision).
    if (
        not first
        and _confirmed(lease, backend.config_state, spec, state) is ConfigState.PROVISIONED
    ):
        return False
    source = spec.template
    _confirmed(lease, backend.write_config, spec, state, source.config_files())
    if not first:
        services.record_config_recovered(
            workspace.id,
            spec.generation,
            template=source.name,
            fallback=source.name != workspace.template,
        )
    return first


def _stop_cycle(
    workspace: Workspace, action: Action, lease: gate.Lease, final_attempt: bool
) -> Ran:
    cycle = services.begin_cycle(
        workspace.id, S.STOPPING, action=action.value, still_owner=lease.confirm
    )
    if cycle is None:
        return Ran.NOTHING
    lease.set_generation(cycle.generation)
    workspace, generation, seq = cycle.workspace, cycle.generation, cycle.seq
    try:
        backend = backend_for(workspace)
    except BackendUnavailable as exc:
        if workspace.is_running:
            _fail(
                workspace,
                generation,
                seq,
                lease=lease,
                source=EventSource.BACKEND,
                message=str(exc),
                payload={"backend": exc.backend, "action": "stop"},
            )
        else:
            services.complete_stop(workspace.id, generation, seq, dict(workspace.backend_state))
        return Ran.DONE
    try:
        grace = settings.STOP_GRACE_SECONDS
        state = _confirmed(lease, backend.stop, workspace.id, workspace.backend_state, grace)
    except BackendError as exc:
        if isinstance(exc, TransientBackendError) and not final_attempt:
            raise
        _fail(
            workspace,
            generation,
            seq,
            lease=lease,
            source=EventSource.BACKEND,
            message=_backend_failure(exc),
            payload={"action": "stop", "transient": isinstance(exc, TransientBackendError)},
        )
        return Ran.DONE
    services.complete_stop(workspace.id, generation, seq, state)
    return Ran.DONE


def _remove_cycle(
    workspace: Workspace, action: Action, lease: gate.Lease, final_attempt: bool
) -> Ran:
    cycle = services.begin_cycle(
        workspace.id, S.REMOVING, action=action.value, still_owner=lease.confirm
    )
    if cycle is None:
        return Ran.NOTHING
    lease.set_generation(cycle.generation)
    workspace, generation = cycle.workspace, cycle.generation
    try:
        backend = backend_for(workspace)
    except BackendUnavailable as exc:
        if not _leftover_possible(workspace) and workspace.config_populated_at is None:
            services.complete_remove(workspace.id, generation)  # nothing was ever created
            return Ran.DONE
        # Resources may exist: stay `removing`, say why; the redrive sweep tries again later.
        services.record_error(workspace.id, generation, f"removal waits: {exc}")
        return Ran.NOTHING
    try:
        _confirmed(lease, backend.remove, workspace.id, workspace.backend_state)
    except BackendError as exc:
        lease.ensure()
        services.record_error(workspace.id, generation, f"removal failed, will retry: {exc}")
        if isinstance(exc, TransientBackendError) and not final_attempt:
            raise
        return Ran.NOTHING
    services.complete_remove(workspace.id, generation)
    return Ran.DONE


REAP_FAILED_SUFFIX = " (stopping what was left failed, will retry: "


def _reap_cycle(
    workspace: Workspace, action: Action, lease: gate.Lease, final_attempt: bool
) -> Ran:
    """Stop whatever a failed cycle left running; the row stays ``failed``.

    If the backend cannot stop it now, the intent stays pending and the redrive sweep brings
    this cycle back: nothing may keep running that the database calls failed.
    """
    cycle = services.begin_reap(workspace.id, still_owner=lease.confirm)
    if cycle is None:
        return Ran.NOTHING
    lease.set_generation(cycle.generation)
    workspace, generation, seq = cycle.workspace, cycle.generation, cycle.seq
    base_error = workspace.last_error.split(REAP_FAILED_SUFFIX)[0]
    try:
        backend = backend_for(workspace)
        grace = settings.STOP_GRACE_SECONDS
        state = _confirmed(lease, backend.stop, workspace.id, workspace.backend_state, grace)
    except BackendError as exc:
        lease.ensure()
        services.record_error(workspace.id, generation, f"{base_error}{REAP_FAILED_SUFFIX}{exc})")
        if isinstance(exc, TransientBackendError) and not final_attempt:
            raise
        logger.warning("could not stop what failed workspace %s left: %s", workspace.id, exc)
        return Ran.NOTHING
    services.record_backend_facts(
        workspace.id, generation, is_running=False, backend_state=state, handled_seq=seq
    )
    if base_error != workspace.last_error:
        services.record_error(workspace.id, generation, base_error)
    logger.info("stopped what failed workspace %s left running", workspace.id)
    return Ran.DONE


_CYCLES: dict[Action, Callable[[Workspace, Action, gate.Lease, bool], Ran]] = {
    Action.PROVISION: _start_cycle,
    Action.START: _start_cycle,
    Action.RESTART: _start_cycle,
    Action.CLAIM: _start_cycle,
    Action.STOP: _stop_cycle,
    Action.REMOVE: _remove_cycle,
    Action.REAP: _reap_cycle,
}
