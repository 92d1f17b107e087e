"""Admission limits, checked inside the request's own transaction before anything is written:

* ``WORKSPACE_QUOTA_PER_USER``: how many workspaces (any status but ``removed``) one owner may
  have; a team counts its parent and every member. Staff are exempt.
* ``PROVISIONING_CONCURRENCY_LIMIT``: how many cycles may be in flight platform-wide (a cycle
  requested and not finished, or a workspace ``provisioning`` while its agent has not
  registered). Create, start and restart are refused over it; stop and delete never are, since
  they free resources.

Over a limit the caller gets ``LimitExceeded`` (HTTP 429 with ``Retry-After``) and the
transaction rolls back, so nothing is written. ``0`` switches a limit off.

Both checks count rows and then insert or update them; two requests that count at the same time
would both see room for one more. So each check first takes a lock that every request of its kind
takes too, and holds it until its transaction commits: the owner's ``auth_user`` row (``FOR NO
KEY UPDATE``: other owners, and inserts that reference the row, do not wait) for the quota, and the
named lock ``locks.ADMISSION`` for the global cap. Lock order is always the owner's row or the
workspace's row first, the admission lock last, so the two cannot deadlock."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import F, Q

from workspaces import locks
from workspaces.models import Workspace
from workspaces.services.common import LimitExceeded
from workspaces.status import WorkspaceStatus

S = WorkspaceStatus


def in_flight() -> Q:
    """Rows with a cycle in flight. Each side is served by its partial index
    (``ws_provisioning_inflight``, ``ws_pending_intent``), so counting costs the rows in flight,
    not the table. A warm pool's members wait in ``provisioning`` with no cycle to run: they
    count against no cap (a claim does: it puts the hand-over in flight)."""
    return (Q(status=S.PROVISIONING) | Q(requested_seq__gt=F("handled_seq"))) & Q(pool="")


def check_quota(owner: User, adding: int) -> None:
    """Refuse ``adding`` more workspaces for ``owner`` when they would exceed the quota. Call it
    inside the transaction that inserts them."""
    quota: int = settings.WORKSPACE_QUOTA_PER_USER
    if quota <= 0 or owner.is_staff:
        return
    # Serialises the count-then-insert of one owner's concurrent creates.
    list(User.objects.select_for_update(no_key=True).filter(pk=owner.pk).values_list("pk"))
    have = Workspace.objects.filter(owner=owner).exclude(status=S.REMOVED).count()
    if have + adding > quota:
        raise LimitExceeded(
            f"workspace quota reached: you have {have} of {quota} workspaces"
            + (f" and this request adds {adding}" if adding > 1 else "")
            + "; delete one first (WORKSPACE_QUOTA_PER_USER)",
            retry_after=settings.WORKSPACE_QUOTA_RETRY_AFTER_SECONDS,
        )


def check_concurrency(adding: int) -> None:
    """Refuse ``adding`` more cycles when they would exceed the platform's cap on cycles in
    flight. Call it inside the transaction that records them, after any row lock it takes."""
    limit: int = settings.PROVISIONING_CONCURRENCY_LIMIT
    if limit <= 0 or adding <= 0:
        return
    # Held until commit: the next admission counts this one's rows.
    locks.hold(locks.ADMISSION)
    busy = Workspace.objects.filter(in_flight()).count()
    if busy + adding > limit:
        raise LimitExceeded(
            f"too many workspaces are being provisioned: {busy} cycles in flight, the limit is "
            f"{limit} (PROVISIONING_CONCURRENCY_LIMIT); try again shortly",
            retry_after=settings.PROVISIONING_RETRY_AFTER_SECONDS,
        )


def adds_cycle(workspace: Workspace) -> bool:
    """Whether a start or restart request for this (locked) row puts one more cycle in flight.
    A workspace already in flight does not: its pending cycle answers the new request too
    (requests coalesce), so a restart storm on one workspace is never refused."""
    return not (
        workspace.status == S.PROVISIONING or workspace.requested_seq > workspace.handled_seq
    )
