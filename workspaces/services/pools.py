"""Warm pools: per template, instances made ahead of any request, claimed by a create
(``services.claims``).

A member is a ``Workspace`` row of the platform's pool user with ``pool`` = its template's name.
Its cycles are ordinary cycles (the gate, the generation, the events), but what it launches is
only what does not depend on who asks: a uid or a container, a network link, the config volume,
the agent, running and waiting. It holds no identity, token or env of anyone.

The sweep (``provisioning.pools``) refills each pool to its size and retires members whose
template changed, that failed, or that a smaller size no longer needs; retiring is a removal by
compare-and-set on ``pool``, so a member claimed meanwhile is left alone.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Count, Q, QuerySet

from workspaces import locks
from workspaces.manifests import Template, pool_size, pooled_templates, templates
from workspaces.models import Workspace
from workspaces.services.claims import ready_members
from workspaces.services.requests import _insert_workspace, _record_remove
from workspaces.status import DesiredState, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus

ACTOR = "pool"


def pool_owner() -> User:
    """The platform's user that owns unclaimed members: never active, no password."""
    owner, made = User.objects.get_or_create(
        username=settings.WORKSPACE_POOL_OWNER, defaults={"is_active": False}
    )
    if made:
        owner.set_unusable_password()
        owner.save(update_fields=["password"])
    return owner


def members() -> QuerySet[Workspace]:
    """Every pool member that is not removed (a queryset)."""
    return Workspace.objects.exclude(pool="").exclude(status=S.REMOVED)


@dataclass(frozen=True)
class Refill:
    template: str
    wanted: int
    had: int
    made: list[UUID]


def refill(template: Template, backend: str | None = None) -> Refill:
    """Insert the members ``template``'s pool lacks and enqueue their cycles after the commit.
    Members being made count: a sweep that runs while they start adds none. Serialised per
    template by a named lock, so two sweeps never both fill the same gap."""
    backend = backend or settings.WORKSPACE_BACKEND
    wanted = pool_size(template)
    with transaction.atomic():
        # A lock's name holds 64 characters: two long names cut alike only share a lock.
        locks.hold(f"pool:{template.name}"[:64])
        had = (
            members()
            .filter(pool=template.name, pool_fingerprint=template.fingerprint, backend=backend)
            .exclude(desired_state=DesiredState.REMOVED)
            .exclude(status=S.FAILED)
            .count()
        )
        made: list[UUID] = []
        if had < wanted:
            owner = pool_owner()
            for _ in range(wanted - had):
                member = _insert_workspace(
                    owner=owner,
                    name=f"pool-{uuid.uuid4().hex[:16]}",
                    manifest=template,
                    env={},
                    backend=backend,
                    actor=ACTOR,
                    pool=template.name,
                    pool_fingerprint=template.fingerprint,
                )
                made.append(member.id)
    return Refill(template.name, wanted, had, made)


def retire_member(workspace_id: UUID, template_name: str, reason: str) -> bool:
    """Remove a member that is still a member (compare-and-set on ``pool``): a member claimed
    meanwhile is someone's workspace and is left alone. Its removal is an ordinary remove cycle."""
    with transaction.atomic():
        still = (
            Workspace.objects.select_for_update(of=("self",))
            .filter(id=workspace_id, pool=template_name)
            .exclude(desired_state=DesiredState.REMOVED)
            .values_list("id", flat=True)
            .first()
        )
        if still is None:
            return False
        _record_remove(workspace_id, f"{ACTOR}:{reason}")
    logger.info("retired pool member %s of %s: %s", workspace_id, template_name, reason)
    return True


@dataclass(frozen=True)
class PoolCounts:
    template: str
    backend: str
    desired: int
    ready: int
    starting: int
    failed: int
    stale: int


def pool_counts(backend: str | None = None) -> list[PoolCounts]:
    """Per pooled template: the size asked for and its members by state (metrics, admin, the
    refill command's report)."""
    backend = backend or settings.WORKSPACE_BACKEND
    found: list[PoolCounts] = []
    by_template = {t.name: t for t in templates().templates.values()}
    names = set(by_template) & (
        {t.name for t in pooled_templates()}
        | set(members().values_list("pool", flat=True).distinct())
    )
    for name in sorted(names):
        template = by_template[name]
        rows = members().filter(pool=name, backend=backend)
        current = Q(pool_fingerprint=template.fingerprint)
        tally = rows.aggregate(
            ready=Count("id", filter=ready_members(template, backend)),
            failed=Count("id", filter=Q(status=S.FAILED)),
            stale=Count("id", filter=~current),
            live=Count(
                "id",
                filter=current & ~Q(status=S.FAILED) & ~Q(desired_state=DesiredState.REMOVED),
            ),
        )
        found.append(
            PoolCounts(
                template=name,
                backend=backend,
                desired=pool_size(template),
                ready=tally["ready"],
                starting=tally["live"] - tally["ready"],
                failed=tally["failed"],
                stale=tally["stale"],
            )
        )
    return found
