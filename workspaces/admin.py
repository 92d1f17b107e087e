"""The admin: look at workspaces and their events; act through the same services as the API.

Rows are read-only here: every change is a request to the services (start, stop, restart,
remove), so the admin cannot bypass the gate, the transition table or the lifecycle. Env values
are never shown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent


class WorkspaceEventInline(admin.TabularInline):
    model = WorkspaceEvent
    fields = ["created_at", "type", "source", "generation", "payload"]
    readonly_fields = ["created_at", "type", "source", "generation", "payload"]
    extra = 0
    can_delete = False
    ordering = ["id"]
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _bulk(
    request_fn: Callable[[Any], Workspace], verb: str
) -> Callable[[admin.ModelAdmin, HttpRequest, QuerySet[Workspace]], None]:
    def run(
        modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Workspace]
    ) -> None:
        accepted, refused = 0, []
        for workspace in queryset:
            try:
                request_fn(workspace.id)
                accepted += 1
            except services.TransitionNotAllowed as exc:
                refused.append(f"{workspace.name}: {exc}")
        if accepted:
            modeladmin.message_user(request, f"{verb} requested for {accepted} workspace(s).")
        for message in refused:
            modeladmin.message_user(request, message, level=messages.WARNING)

    run.__name__ = f"{verb.lower()}_selected"
    return run


@admin.register(Workspace)
class WorkspaceAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "owner",
        "template",
        "runtime",
        "backend",
        "status",
        "is_running",
        "generation",
        "last_started_at",
        "updated_at",
    ]
    list_filter = ["status", "runtime", "backend", "is_running"]
    search_fields = ["name", "id", "owner__username", "template"]
    list_select_related = ["owner"]
    ordering = ["-created_at"]
    exclude = ["env"]  # write-only: never shown
    readonly_fields = [
        "id",
        "owner",
        "name",
        "template",
        "runtime",
        "backend",
        "parent",
        "status",
        "desired_state",
        "is_running",
        "last_started_at",
        "last_heartbeat_at",
        "last_error",
        "generation",
        "requested_seq",
        "handled_seq",
        "provisioning_started_at",
        "config_populated_at",
        "backend_state",
        "created_at",
        "updated_at",
    ]
    inlines = [WorkspaceEventInline]
    actions = [
        _bulk(services.request_start, "Start"),
        _bulk(services.request_stop, "Stop"),
        _bulk(services.request_restart, "Restart"),
        _bulk(services.request_remove, "Remove"),
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # create through the API: it validates the template and env

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # "Remove" goes through the lifecycle; a row delete would orphan resources
