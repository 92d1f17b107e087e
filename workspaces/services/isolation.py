"""Isolation writes: the uid a process-backend workspace runs as (on Docker with veth links: the
number of its link), and the single-owner rule of unisolated development
(``WORKSPACE_PROCESS_ISOLATION=none``).

A uid is taken from ``WORKSPACE_UID_RANGE`` under the named lock ``locks.UIDS``, held until the
transaction ends (allocations queue instead of racing); the partial unique constraint
``workspace_uid_unique_live`` is what guarantees that two live workspaces never share one.
Removal releases it: the constraint and the allocator both ignore removed rows.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, OuterRef

from workspaces import locks
from workspaces.models import Workspace
from workspaces.services.common import LeaseLost, TransitionNotAllowed, _fenced
from workspaces.status import WorkspaceStatus

S = WorkspaceStatus


class IsolationRefused(TransitionNotAllowed):
    """The request would break the isolation rules (HTTP 409 with the reason)."""


def uid_isolation_applies(backend: str) -> bool:
    """Whether a workspace on ``backend`` holds a uid of ``WORKSPACE_UID_RANGE``: the process
    backend runs it as that uid; the Docker backend with ``DOCKER_NETWORK_MODE=veth`` numbers its
    link by it (the uid's offset picks the link's /31, unique among live workspaces)."""
    if backend == "process":
        return bool(settings.WORKSPACE_PROCESS_ISOLATION == "uid")
    return backend == "docker" and settings.DOCKER_NETWORK_MODE == "veth"


def allocate_uid() -> int:
    """The lowest uid of ``WORKSPACE_UID_RANGE`` no live workspace holds. Call inside a
    transaction that then writes it; the lock is held until that transaction ends.

    The lowest free uid is the range's first or one past a live uid: PostgreSQL finds it among
    the live uids through their unique index and returns that one number, instead of every live
    uid read back and searched in Python."""
    locks.hold(locks.UIDS)
    low, high = settings.WORKSPACE_UID_RANGE
    live = Workspace.objects.exclude(status=S.REMOVED)
    if not live.filter(isolation_uid=low).exists():
        return int(low)
    after_live = (
        live.filter(isolation_uid__gte=low, isolation_uid__lt=high)
        .annotate(candidate=F("isolation_uid") + 1)
        .filter(~Exists(live.filter(isolation_uid=OuterRef("candidate"))))
        .order_by("candidate")
        .values_list("candidate", flat=True)
        .first()
    )
    if after_live is not None:
        return int(after_live)
    raise IsolationRefused(
        f"every workspace uid of WORKSPACE_UID_RANGE={low}-{high} is in use: remove a workspace "
        "or widen the range"
    )


def check_unisolated_owner(owner: Any, backend: str) -> None:
    """Without uid isolation every workspace runs as the platform's user and can read every
    other's files and env, so only one owner may have live workspaces on the process backend."""
    if backend != "process" or settings.WORKSPACE_PROCESS_ISOLATION != "none":
        return
    locks.hold(locks.UIDS)
    others = (
        Workspace.objects.exclude(status=S.REMOVED).filter(backend="process").exclude(owner=owner)
    )
    if others.exists():
        raise IsolationRefused(
            "WORKSPACE_PROCESS_ISOLATION=none runs every workspace as the platform's own user, "
            "so only one owner may have workspaces on the process backend; another owner has some"
        )


def isolation_fields(owner: Any, backend: str) -> dict[str, Any]:
    """The isolation columns of a new workspace (inside the inserting transaction)."""
    if uid_isolation_applies(backend):
        return {"isolation_uid": allocate_uid()}
    check_unisolated_owner(owner, backend)
    return {}


def ensure_isolation_uid(workspace_id: UUID, generation: int) -> int:
    """The workspace's uid, allocating one for a row that has none (created before isolation,
    or while isolation was off). Fenced by the cycle's generation."""
    with transaction.atomic():
        current = (
            Workspace.objects.filter(id=workspace_id)
            .values_list("isolation_uid", flat=True)
            .first()
        )
        if current is not None:
            return int(current)
        uid = allocate_uid()
        if _fenced(workspace_id, generation).update(isolation_uid=uid) != 1:
            raise LeaseLost(f"workspace {workspace_id} moved past generation {generation}")
        return uid
