"""Reads. Views and the admin ask here; nothing here writes."""

from __future__ import annotations

from collections.abc import Collection
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Prefetch, Q, QuerySet

from workspaces.crypto import token_digest
from workspaces.models import ApiToken, Workspace, WorkspaceEvent
from workspaces.status import WorkspaceStatus


def visible_workspaces(user: AbstractBaseUser | AnonymousUser | None) -> QuerySet[Workspace]:
    """The caller's workspaces; staff see everyone's. Others' rows are simply absent (404).
    ``None`` is an operator on the command line: everyone's."""
    # Reads never need the write-only env or the backend's opaque state: not loading them keeps
    # secrets out of read paths and saves decoding two JSON columns per row.
    rows = (
        Workspace.objects.select_related("owner")
        .defer("env", "backend_state")
        .prefetch_related(
            # A team's members on its parent: one query per page, not one per row.
            Prefetch(
                "members", queryset=Workspace.objects.only("id", "name", "status", "parent_id")
            )
        )
    )
    if user is not None and not getattr(user, "is_staff", False):
        rows = rows.filter(owner_id=user.pk)
    # A warm pool's unclaimed members belong to no person: operators see them in the admin and
    # in /metrics, nobody in the API or the dashboard.
    return rows.filter(pool="")


# What the lifecycle plans a cycle from (``provisioning.lifecycle.plan``), with the owner's
# username for its logs: the columns ``plan_row`` reads.
PLAN_FIELDS = (
    "name",
    "status",
    "desired_state",
    "generation",
    "is_running",
    "requested_seq",
    "handled_seq",
    "claim_pending",
    "pool",
)


def plan_row(workspace_id: UUID) -> Workspace | None:
    """The workspace with ``PLAN_FIELDS`` loaded (the others deferred) and its owner with the
    username, in one query, or None when there is no such row. The lifecycle reads this before
    every cycle and once more after the last, unless that cycle's last write found nothing newer
    asked."""
    try:
        # get(), not first(): a primary key needs no ORDER BY, which the ORM would compile.
        return (
            Workspace.objects.select_related("owner")
            .only("owner__username", *PLAN_FIELDS)
            .get(id=workspace_id)
        )
    except Workspace.DoesNotExist:
        return None


# ?ordering= values: each may be prefixed with "-" for descending.
ORDERING_FIELDS = ("name", "created_at", "updated_at", "status", "template", "runtime", "owner")


def list_workspaces(
    user: AbstractBaseUser | AnonymousUser | None,
    *,
    status: WorkspaceStatus | None = None,
    owner: str | None = None,
    name: str | None = None,
    template: str | None = None,
    runtime: str | None = None,
    backend: str | None = None,
    ordering: str | None = None,
) -> QuerySet[Workspace]:
    """The caller's workspaces (staff: everyone's), filtered by exact values. Removed workspaces
    appear only when asked for with ``status=removed``."""
    rows = visible_workspaces(user).select_related("owner")
    if status is not None:
        rows = rows.filter(status=status)
    else:
        rows = rows.exclude(status=WorkspaceStatus.REMOVED)
    exact = {"owner__username": owner, "name": name, "template": template, "runtime": runtime}
    rows = rows.filter(**{key: value for key, value in exact.items() if value is not None})
    if backend is not None:
        rows = rows.filter(backend=backend)
    if ordering:
        field = ordering.lstrip("-")
        column = "owner__username" if field == "owner" else field
        return rows.order_by(("-" if ordering.startswith("-") else "") + column, "id")
    return rows.order_by("-created_at", "id")


def workspace_events(workspace_id: UUID, *, after: int | None = None) -> QuerySet[WorkspaceEvent]:
    events = WorkspaceEvent.objects.filter(workspace_id=workspace_id)
    if after is not None:
        events = events.filter(id__gt=after)
    return events.order_by("id")


def events_visible_to(
    user: AbstractBaseUser | AnonymousUser,
    *,
    after: int,
    workspaces: Collection[str] | None = None,
) -> QuerySet[WorkspaceEvent]:
    """Every event of the caller's workspaces (staff: everyone's), or of those of them in
    ``workspaces``, with an id above ``after``, oldest first: the replay of a resumed stream."""
    events = WorkspaceEvent.objects.filter(id__gt=after)
    if workspaces is not None:
        events = events.filter(workspace_id__in=list(workspaces))
    if not getattr(user, "is_staff", False):
        events = events.filter(workspace__owner_id=user.pk)
    return events.order_by("id")


def workspace_and_members(workspace_id: UUID) -> frozenset[str]:
    """The ids of a workspace and of its team's members (a team workspace's page shows both)."""
    rows = Workspace.objects.filter(Q(id=workspace_id) | Q(parent_id=workspace_id))
    return frozenset({str(workspace_id), *(str(row) for row in rows.values_list("id", flat=True))})


def api_token(key: str) -> ApiToken | None:
    """The user API token whose key this is (looked up by its SHA-256), with its user."""
    try:
        return ApiToken.objects.select_related("user").get(digest=token_digest(key))  # unique
    except ApiToken.DoesNotExist:
        return None
