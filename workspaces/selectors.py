"""Reads. Views and the admin ask here; nothing here writes."""

from __future__ import annotations

from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import WorkspaceStatus


def visible_workspaces(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Workspace]:
    """The caller's workspaces; staff see everyone's. Others' rows are simply absent (404)."""
    # Reads never need the write-only env or the backend's opaque state: not loading them keeps
    # secrets out of read paths and saves decoding two JSON columns per row.
    rows = Workspace.objects.defer("env", "backend_state")
    if not getattr(user, "is_staff", False):
        rows = rows.filter(owner_id=user.pk)
    return rows


def list_workspaces(
    user: AbstractBaseUser | AnonymousUser, *, status: WorkspaceStatus | None = None
) -> QuerySet[Workspace]:
    rows = visible_workspaces(user)
    if status is not None:
        rows = rows.filter(status=status)
    else:
        rows = rows.exclude(status=WorkspaceStatus.REMOVED)
    return rows.order_by("-created_at", "id")


def workspace_events(workspace_id: UUID, *, after: int | None = None) -> QuerySet[WorkspaceEvent]:
    events = WorkspaceEvent.objects.filter(workspace_id=workspace_id)
    if after is not None:
        events = events.filter(id__gt=after)
    return events.order_by("id")


def events_visible_to(
    user: AbstractBaseUser | AnonymousUser, *, after: int
) -> QuerySet[WorkspaceEvent]:
    """Every event of the caller's workspaces (staff: everyone's) with an id above ``after``,
    oldest first: the replay of a resumed event stream."""
    events = WorkspaceEvent.objects.filter(id__gt=after)
    if not getattr(user, "is_staff", False):
        events = events.filter(workspace__owner_id=user.pk)
    return events.order_by("id")
