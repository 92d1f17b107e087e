"""Requests (API, admin, ``manage.py workspace``): record the intent (``desired_state`` and
``requested_seq``) in one transaction and enqueue a converge task with ``delay_on_commit``. They
never touch the backend and never wait for the gate."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import F, prefetch_related_objects
from django.utils import timezone

from workspaces import audit
from workspaces.access import subdomain
from workspaces.manifests import Template, templates
from workspaces.models import Workspace
from workspaces.services.claims import claim_member
from workspaces.services.common import (
    NAME_RE,
    InvalidInput,
    TransitionNotAllowed,
    _enqueue_converge,
    _locked,
    check_env_size,
    transition,
    validate_env,
    validate_name,
)
from workspaces.services.isolation import isolation_fields
from workspaces.services.limits import adds_cycle, check_concurrency, check_quota
from workspaces.status import (
    DesiredState,
    WorkspaceStatus,
)

logger = logging.getLogger(__name__)
S = WorkspaceStatus

APP_PORT_ATTEMPTS = 5


# --- requests ------------------------------------------------------------------------------------
def _answerable(*workspaces: Workspace) -> None:
    """Load what the API's answer reads of these rows (owner, team members) before the commit:
    once the intent is committed, nothing may touch the database again and turn a recorded
    request into an error response (a lost connection there would be a 503 for a request that
    took effect, and the client's retry a different answer)."""
    prefetch_related_objects(list(workspaces), "owner", "members")


def _template_for(template: Any) -> Template:
    manifest = templates().get(template) if isinstance(template, str) else None
    if manifest is None:
        raise InvalidInput("template", f"unknown template {template!r}")
    return manifest


def _validated(
    name: Any, env: Mapping[str, str] | None, template: Any
) -> tuple[dict[str, str], Template]:
    """A create's input checked before anything is written: the name, the env (keys, values,
    size) and the template; returns the clean env and the template."""
    validate_name(name)
    clean_env = validate_env(env)
    check_env_size(clean_env)
    return clean_env, _template_for(template)


_PORT_CANDIDATES = 8


def _free_app_port(manifest: Template) -> int | None:
    """The app port for a new workspace of ``manifest``: its fixed port, a random free one of
    WORKSPACE_APP_PORTS, or None when the template serves no app. The database constraint
    ``workspace_app_port_unique_live`` decides between concurrent creators."""
    if manifest.app is None:
        return None
    if manifest.app.port is not None:
        return manifest.app.port
    low, high = settings.WORKSPACE_APP_PORT_RANGE
    # A few random candidates first: one small query whatever the number of workspaces (the
    # constraint's unique index answers it). Only a range nearly full reads every port in use.
    candidates = {secrets.randbelow(high - low + 1) + low for _ in range(_PORT_CANDIDATES)}
    taken = set(
        Workspace.objects.exclude(status=S.REMOVED)
        .filter(app_port__in=candidates)
        .values_list("app_port", flat=True)
    )
    if candidates - taken:
        return secrets.choice(sorted(candidates - taken))
    live = Workspace.objects.exclude(status=S.REMOVED)
    used = set(live.filter(app_port__range=(low, high)).values_list("app_port", flat=True))
    free = [port for port in range(low, high + 1) if port not in used]
    if not free:
        raise InvalidInput(
            "template", f"no free app port left in WORKSPACE_APP_PORTS ({low}-{high})"
        )
    return secrets.choice(free)


def _insert_workspace(
    *,
    owner: User,
    name: str,
    manifest: Template,
    env: dict[str, str],
    backend: str,
    parent: Workspace | None = None,
    actor: str,
    pool: str = "",
    pool_fingerprint: str = "",
) -> Workspace:
    """Insert one workspace asking to run and enqueue its converge after the commit (a warm
    pool's member when ``pool`` names its template: no host name, no route until claimed)."""
    isolation = isolation_fields(owner, backend)
    for attempt in range(APP_PORT_ATTEMPTS):
        app_port = _free_app_port(manifest)
        try:
            # A savepoint, so a name clash surfaces as a clean 400 inside a caller's transaction.
            with transaction.atomic():
                workspace = Workspace.objects.create(
                    owner=owner,
                    name=name,
                    subdomain="" if pool else subdomain(name, owner.username),
                    pool=pool,
                    pool_fingerprint=pool_fingerprint,
                    template=manifest.name,
                    runtime=manifest.runtime,
                    sandbox=manifest.sandbox,
                    backend=backend,
                    parent=parent,
                    status=S.PROVISIONING,
                    desired_state=DesiredState.RUNNING,
                    env=env,
                    app_port=app_port,
                    requested_seq=1,
                    handled_seq=0,
                    provisioning_started_at=timezone.now(),
                    status_changed_at=timezone.now(),
                    requested_by=actor,
                    **isolation,
                )
        except IntegrityError as exc:
            if "workspace_name_unique_per_owner" in str(exc):
                raise InvalidInput("name", f"you already have a workspace named {name!r}") from None
            if "workspace_app_port_unique_live" in str(exc):
                fixed = manifest.app is not None and manifest.app.port is not None
                if fixed or attempt == APP_PORT_ATTEMPTS - 1:
                    raise InvalidInput(
                        "template",
                        f"app port {app_port} of template {manifest.name!r} is in use by "
                        "another workspace",
                    ) from None
                continue  # a concurrent create took the same port: draw again
            raise
        _enqueue_converge(workspace.id)
        return workspace
    raise AssertionError("unreachable")  # pragma: no cover


def _claim_or_insert(
    *,
    owner: User,
    name: str,
    manifest: Template,
    env: dict[str, str],
    backend: str,
    actor: str,
    parent: Workspace | None = None,
) -> Workspace:
    """One workspace of a create (a single one, or a team's parent or member): a ready member of
    its template's warm pool when there is one, otherwise a cold start, as if there were no
    pool. Inside the create's transaction."""
    return claim_member(
        owner=owner,
        name=name,
        manifest=manifest,
        env=env,
        backend=backend,
        actor=actor,
        parent=parent,
    ) or _insert_workspace(
        owner=owner,
        name=name,
        manifest=manifest,
        env=env,
        backend=backend,
        actor=actor,
        parent=parent,
    )


def create_workspace(
    *,
    owner: User,
    name: str,
    template: str,
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
    actor: str | None = None,
) -> Workspace:
    clean_env, manifest = _validated(name, env, template)
    if manifest.is_team:
        raise InvalidInput("template", f"{template!r} is a team template: use POST /api/teams/")
    backend = backend or settings.WORKSPACE_BACKEND
    actor = actor or audit.user(owner)
    with transaction.atomic():
        check_quota(owner, adding=1)
        check_concurrency(adding=1)
        workspace = _claim_or_insert(
            owner=owner, name=name, manifest=manifest, env=clean_env, backend=backend, actor=actor
        )
        # What the answer reads is at hand: the owner (the caller's object, or loaded with the
        # claimed row), and no team members: a row inserted or claimed by a single create has
        # none (an empty result, no query).
        workspace._prefetched_objects_cache = {  # type: ignore[attr-defined]  # set by Django
            "members": Workspace.objects.none()
        }
        return workspace


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
    actor: str | None = None,
) -> Team:
    """Expand a team template into its parent workspace and one workspace per member template,
    all in one transaction. The parent runs the team template's own runtime like any workspace;
    every member gets the same env and is provisioned (and preflighted) on its own, so one
    member's failure shows on that member. Each is claimed from its template's warm pool when
    it can be, as a single create is (``_claim_or_insert``)."""
    clean_env, manifest = _validated(name, env, template)
    if not manifest.is_team:
        raise InvalidInput("template", f"{template!r} is not a team template (it lists no members)")
    member_names = team_member_names(name, manifest.members)
    for member_name in member_names:
        if not NAME_RE.fullmatch(member_name):
            raise InvalidInput(
                "name",
                f"the member name {member_name!r} would be invalid: use a shorter team name",
            )
    template_set = templates()
    missing = [member for member in manifest.members if template_set.get(member) is None]
    if missing:
        raise InvalidInput("template", f"member templates not found: {', '.join(missing)}")
    member_manifests = [template_set.templates[member] for member in manifest.members]
    backend_name = backend or settings.WORKSPACE_BACKEND
    actor = actor or audit.user(owner)
    with transaction.atomic():
        # A team counts its parent and every member, against the quota and the cap alike.
        check_quota(owner, adding=1 + len(member_names))
        check_concurrency(adding=1 + len(member_names))
        # Each workspace from its own template's warm pool when it can (a team template keeps
        # no pool: the parent starts cold), the members with their parent set by the claim as
        # by the insert.
        parent = _claim_or_insert(
            owner=owner,
            name=name,
            manifest=manifest,
            env=clean_env,
            backend=backend_name,
            actor=actor,
        )
        members = [
            _claim_or_insert(
                owner=owner,
                name=member_name,
                manifest=member_manifest,
                env=clean_env,
                backend=backend_name,
                parent=parent,
                actor=actor,
            )
            for member_name, member_manifest in zip(member_names, member_manifests, strict=True)
        ]
        _answerable(parent, *members)
    logger.info("team %s (%s) created with %d members", name, parent.id, len(members))
    return Team(parent, members)


def _requested(workspace: Workspace, verb: str, actor: str) -> Workspace:
    """Read the row back, with what the answer shows, inside the caller's transaction."""
    workspace.refresh_from_db()
    _answerable(workspace)
    logger.info(
        "workspace %s/%s (%s) %s requested by %s: status %s",
        workspace.owner.username,
        workspace.name,
        workspace.id,
        verb,
        actor,
        workspace.status,
    )
    return workspace


def _record_run(workspace: Workspace, verb: str, actor: str) -> Workspace:
    """Record the intent to run (start or restart) of a row locked by the caller's transaction:
    the provisioning cap first (nothing is written past it), then one UPDATE and the converge
    task after commit."""
    if adds_cycle(workspace):
        check_concurrency(adding=1)
    now = timezone.now()
    Workspace.objects.filter(id=workspace.id).update(
        desired_state=DesiredState.RUNNING,
        requested_seq=F("requested_seq") + 1,
        requested_by=actor,
        restart_at=None,  # a request supersedes the restart policy's pending restart
        updated_at=now,
        last_activity_at=now,  # an API action is activity
        stop_reason={},
    )
    _enqueue_converge(workspace.id)
    # Read back before the commit: nothing after it may fail and turn the recorded intent into
    # an error response.
    return _requested(workspace, verb, actor)


def request_start(workspace_id: UUID, *, actor: str = audit.SYSTEM) -> Workspace:
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
        return _record_run(workspace, "start", actor)


def request_stop(workspace_id: UUID, *, actor: str = audit.SYSTEM) -> Workspace:
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
                requested_by=actor,
                restart_at=None,  # a request supersedes the restart policy's pending restart
                updated_at=timezone.now(),
                stop_reason={},  # a person asked: the stop is theirs, not a policy's
            )
            # Say "stopping" at once; the cycle that does the work bumps the generation, so a
            # start cycle still in flight cannot write "online" over it (stopping -> online is
            # not in the table).
            transition(workspace_id, S.STOPPING)
            _enqueue_converge(workspace_id)
        # Read back before the commit: nothing after it may fail and turn the recorded intent
        # into an error response.
        return _requested(workspace, "stop", actor)


def request_restart(workspace_id: UUID, *, actor: str = audit.SYSTEM) -> Workspace:
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status in (S.REMOVING, S.REMOVED):
            raise TransitionNotAllowed(f"workspace is {workspace.status}; it cannot be restarted")
        # Coalescing: every restart bumps requested_seq; the next cycle handles all of them.
        return _record_run(workspace, "restart", actor)


def _record_remove(workspace_id: UUID, actor: str) -> Workspace:
    """Record one workspace's removal intent (row locked by the caller's transaction)."""
    workspace = _locked(workspace_id)
    if workspace.status != S.REMOVED:
        Workspace.objects.filter(id=workspace_id).update(
            desired_state=DesiredState.REMOVED,
            requested_seq=F("requested_seq") + 1,
            requested_by=actor,
            restart_at=None,  # a request supersedes the restart policy's pending restart
            updated_at=timezone.now(),
            stop_reason={},
        )
        transition(workspace_id, S.REMOVING)
        _enqueue_converge(workspace_id)
    return workspace


def request_remove(workspace_id: UUID, *, actor: str = audit.SYSTEM) -> Workspace:
    """Remove a workspace; removing a team's parent removes its members too, in the same
    transaction, each with its own intent and its own converge task (so each goes through its
    own gate and its own remove cycle, and fails or succeeds on its own)."""
    with transaction.atomic():
        workspace = _record_remove(workspace_id, actor)
        # Parent first, then members in id order: every caller locks in the same order.
        member_ids = list(
            Workspace.objects.filter(parent_id=workspace_id)
            .exclude(status=S.REMOVED)
            .order_by("id")
            .values_list("id", flat=True)
        )
        for member_id in member_ids:
            _record_remove(member_id, actor)
        if member_ids:
            logger.info("team %s removal requested with %d members", workspace_id, len(member_ids))
        # Read back before the commit: nothing after it may fail and turn the recorded intent
        # into an error response.
        return _requested(workspace, "remove", actor)


# The lifecycle requests by verb, for the callers that take a verb (admin, dashboard, manage.py).
LIFECYCLE_REQUESTS: dict[str, Callable[..., Workspace]] = {
    "start": request_start,
    "stop": request_stop,
    "restart": request_restart,
    "remove": request_remove,
}

UPDATABLE_FIELDS = ("name", "env")


def update_workspace(
    workspace_id: UUID,
    *,
    name: Any = None,
    env: Any = None,
    fields: frozenset[str],
    actor: str = audit.SYSTEM,
) -> Workspace:
    """Change ``name`` and/or ``env`` (those in ``fields``). The name applies at once (unique per
    owner, as on create); the env replaces the whole map, validated by ``validate_env`` and
    stored through the model field exactly as on create, and reaches the instance at its next
    start or restart (``env_version`` > ``started_env_version`` until then). A removing or
    removed workspace cannot be changed (409)."""
    unknown = sorted(set(fields) - set(UPDATABLE_FIELDS))
    if unknown:
        raise InvalidInput(unknown[0], "cannot be changed")
    values: dict[str, Any] = {}
    if "name" in fields:
        values["name"] = validate_name(name)
    if "env" in fields:
        values["env"] = validate_env(env)
    with transaction.atomic():
        workspace = _locked(workspace_id)
        if workspace.status in (S.REMOVING, S.REMOVED):
            raise TransitionNotAllowed(f"workspace is {workspace.status}; it cannot be changed")
        if not values:
            _answerable(workspace)
            return workspace
        now = timezone.now()
        updates: dict[str, Any] = {"updated_at": now, "last_activity_at": now}
        if "name" in values:
            updates["name"] = values["name"]
            updates["subdomain"] = subdomain(values["name"], workspace.owner.username)
        if "env" in values:
            updates["env"] = values["env"]
            updates["env_version"] = F("env_version") + 1
        try:
            with transaction.atomic():
                Workspace.objects.filter(id=workspace_id).update(**updates)
        except IntegrityError as exc:
            if "workspace_name_unique_per_owner" in str(exc):
                raise InvalidInput(
                    "name", f"you already have a workspace named {values['name']!r}"
                ) from None
            raise
        # Read back before the commit: nothing after it may fail and turn the recorded change
        # into an error response.
        return _requested(workspace, f"update of {', '.join(sorted(values))}", actor)
