"""The admin for operators: look at workspaces and their events; act through the services.

Rows are read-only here: every change is a request to the services (start, stop, restart,
remove), so the admin cannot bypass the gate, the transition table or the lifecycle. Each request
is recorded with the actor ``admin:<username>`` on the workspace's events and in Django's admin
log (LogEntry). Env values are never shown.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from provisioning import idle, logs
from provisioning.backends.base import BackendError
from workspaces import audit, services
from workspaces.models import ApiToken, Workspace, WorkspaceEvent
from workspaces.status import WorkspaceStatus

S = WorkspaceStatus

# Status colours, shared with the dashboard's CSS (portal/static/workspaces/dashboard.css).
STATUS_COLOURS: dict[str, str] = {
    S.PROVISIONING: "#2563eb",
    S.ONLINE: "#15803d",
    S.DEGRADED: "#b45309",
    S.OFFLINE: "#c2410c",
    S.STOPPING: "#6b7280",
    S.STOPPED: "#4b5563",
    S.FAILED: "#b91c1c",
    S.REMOVING: "#7c3aed",
    S.REMOVED: "#9ca3af",
}
REQUESTS = services.LIFECYCLE_REQUESTS
ADMIN_LOG_TAIL = 80
# The operators' tables need the width more than a second navigation column.
admin.site.enable_nav_sidebar = False


def status_badge(status: str) -> SafeString:
    return format_html(
        '<span class="ws-status" style="background:{};color:#fff;padding:2px 8px;'
        'border-radius:9px;font-weight:600;white-space:nowrap">{}</span>',
        STATUS_COLOURS.get(status, "#374151"),
        status,
    )


def duration(since: datetime | None) -> str:
    if since is None:
        return "-"
    seconds = max(0, int((timezone.now() - since).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"
    return f"{seconds // 86400}d {seconds // 3600 % 24}h"


class TeamFilter(admin.SimpleListFilter):
    """A team's parent and its members."""

    title = "team"
    parameter_name = "team"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        parents = (
            Workspace.objects.filter(members__isnull=False)
            .exclude(status=S.REMOVED)
            .select_related("owner")
            .distinct()
            .order_by("owner__username", "name")
        )
        return [(str(ws.id), f"{ws.owner.username}/{ws.name}") for ws in parents]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(Q(id=self.value()) | Q(parent_id=self.value()))
        return queryset


class PoolFilter(admin.SimpleListFilter):
    """Warm pools' unclaimed members (nobody's workspaces), by template, or people's alone."""

    title = "warm pool"
    parameter_name = "pool"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = (
            Workspace.objects.exclude(pool="")
            .exclude(status=S.REMOVED)
            .order_by("pool")
            .values_list("pool", flat=True)
            .distinct()
        )
        return [("-", "not a member (people's)"), *((name, f"members of {name}") for name in names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "-":
            return queryset.filter(pool="")
        if self.value():
            return queryset.filter(pool=self.value())
        return queryset


class WorkspaceEventInline(admin.TabularInline):
    model = WorkspaceEvent
    fields = ["created_at", "type", "source", "actor", "generation", "payload"]
    readonly_fields = ["created_at", "type", "source", "actor", "generation", "payload"]
    extra = 0
    can_delete = False
    ordering = ["id"]
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MemberInline(admin.TabularInline):
    """On a team's parent: its members."""

    model = Workspace
    fk_name = "parent"
    verbose_name = "team member"
    verbose_name_plural = "team members"
    fields = ["member", "status_display", "template", "last_error", "updated_at"]
    readonly_fields = ["member", "status_display", "template", "last_error", "updated_at"]
    extra = 0
    can_delete = False
    show_change_link = False

    @admin.display(description="member")
    def member(self, obj: Workspace) -> SafeString:
        url = reverse("admin:workspaces_workspace_change", args=[obj.id])
        return format_html('<a href="{}">{}</a>', url, obj.name)

    @admin.display(description="status")
    def status_display(self, obj: Workspace) -> SafeString:
        return status_badge(obj.status)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _bulk(
    verb: str,
) -> Callable[[admin.ModelAdmin, HttpRequest, QuerySet[Workspace]], HttpResponse | None]:
    def run(
        modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Workspace]
    ) -> HttpResponse | None:
        assert isinstance(modeladmin, WorkspaceAdmin)
        if verb == "remove" and request.POST.get("confirm") != "yes":
            # Removing deletes the workspace's instance and files: ask first, like Django's
            # own "delete selected".
            return TemplateResponse(
                request,
                "admin/workspaces/workspace/remove_confirmation.html",
                {
                    **modeladmin.admin_site.each_context(request),
                    "title": "Remove workspaces?",
                    "opts": modeladmin.model._meta,
                    "workspaces": list(queryset.select_related("owner")),
                    "action": "remove_selected",
                    "bulk": True,
                },
            )
        for workspace in queryset.select_related("owner"):
            modeladmin.lifecycle_request(request, workspace, verb)
        return None

    run.__name__ = f"{verb}_selected"
    run.short_description = f"{verb.capitalize()} selected workspaces"  # type: ignore[attr-defined]
    return run


@admin.register(Workspace)
class WorkspaceAdmin(admin.ModelAdmin):
    class Media:
        css = {"all": ["workspaces/admin.css"]}

    change_form_template = "admin/workspaces/workspace/change_form.html"
    list_display = [
        "name",
        "owner",
        "status_display",
        "in_state",
        "error_short",
        "template_display",
        "pool",
        "updated_at",
    ]
    list_display_links = ["name"]
    list_filter = [
        "status",
        ("owner", admin.RelatedOnlyFieldListFilter),
        TeamFilter,
        PoolFilter,
        "runtime",
        "backend",
        "sandbox",
        "is_running",
    ]
    search_fields = ["name", "id", "owner__username", "template", "last_error"]
    list_select_related = ["owner"]
    list_per_page = 100
    ordering = ["-created_at"]
    exclude = ["env", "stop_reason"]  # env is write-only: never shown
    readonly_fields = [
        "id",
        "owner",
        "name",
        "template",
        "runtime",
        "backend",
        "sandbox",
        "parent",
        "status_display",
        "in_state",
        "desired_state",
        "requested_by",
        "is_running",
        "last_error",
        "last_started_at",
        "last_heartbeat_at",
        "last_activity_at",
        "idle_stop_at",
        "status_changed_at",
        "generation",
        "requested_seq",
        "handled_seq",
        "provisioning_started_at",
        "config_populated_at",
        "backend_state",
        "pool",
        "pool_fingerprint",
        "created_at",
        "updated_at",
        "recent_output",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("name", "owner", "id"),
                    ("status_display", "in_state", "desired_state", "requested_by"),
                    "last_error",
                    ("template", "runtime", "backend", "sandbox", "parent"),
                    ("is_running", "last_started_at", "last_heartbeat_at"),
                    ("last_activity_at", "idle_stop_at"),
                ]
            },
        ),
        ("Output", {"fields": ["recent_output"]}),
        (
            "Internals",
            {
                "classes": ["collapse"],
                "fields": [
                    ("generation", "requested_seq", "handled_seq"),
                    ("status_changed_at", "provisioning_started_at", "config_populated_at"),
                    "backend_state",
                    ("pool", "pool_fingerprint"),
                    ("created_at", "updated_at"),
                ],
            },
        ),
    ]
    inlines = [MemberInline, WorkspaceEventInline]
    actions = [_bulk("start"), _bulk("stop"), _bulk("restart"), _bulk("remove")]

    # -- columns ----------------------------------------------------------------------------------
    @admin.display(description="idle stop at")
    def idle_stop_at(self, obj: Workspace) -> Any:
        return idle.idle_stop_at(obj)

    @admin.display(description="status", ordering="status")
    def status_display(self, obj: Workspace) -> SafeString:
        return status_badge(obj.status)

    @admin.display(description="template", ordering="template")
    def template_display(self, obj: Workspace) -> SafeString:
        # The sandbox under the template's name: the list stays readable at 1400 px.
        return format_html('{}<br><span class="ws-sandbox">{}</span>', obj.template, obj.sandbox)

    @admin.display(description="in state", ordering="status_changed_at")
    def in_state(self, obj: Workspace) -> str:
        return duration(obj.status_changed_at or obj.updated_at)

    @admin.display(description="last error")
    def error_short(self, obj: Workspace) -> str:
        error = obj.last_error or ""
        return error if len(error) <= 80 else error[:77] + "..."

    @admin.display(description="last lines of output")
    def recent_output(self, obj: Workspace) -> SafeString:
        try:
            output = logs.workspace_logs(obj, ADMIN_LOG_TAIL)
        except BackendError as exc:
            output = f"(the backend cannot be asked: {exc})"
        return format_html(
            '<pre class="ws-log" style="max-height:24em;overflow:auto;background:#111827;'
            'color:#e5e7eb;padding:8px;white-space:pre-wrap;margin:0">{}</pre>',
            output or "(no output)",
        )

    # -- permissions ------------------------------------------------------------------------------
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # create through the API or the dashboard: they validate template and env

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # "Remove" goes through the lifecycle; a row delete would orphan resources

    # -- lifecycle buttons on the detail page ---------------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<uuid:object_id>/lifecycle/<str:verb>/",
                self.admin_site.admin_view(self.lifecycle_view),
                name="workspaces_workspace_lifecycle",
            )
        ]
        return own + super().get_urls()

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method == "POST":
            # Every field is read-only: there is nothing to save, only lifecycle requests.
            return HttpResponseNotAllowed(["GET"])
        context = {**(extra_context or {}), "lifecycle_verbs": list(REQUESTS)}
        return super().change_view(request, object_id, form_url, extra_context=context)

    def lifecycle_view(self, request: HttpRequest, object_id: str, verb: str) -> HttpResponse:
        workspace = (
            Workspace.objects.select_related("owner").defer("env").filter(id=object_id).first()
        )
        if workspace is None or verb not in REQUESTS:
            return HttpResponse(status=404)
        if not self.has_change_permission(request, workspace):
            return HttpResponse(status=403)
        change_url = reverse("admin:workspaces_workspace_change", args=[workspace.id])
        if request.method != "POST":
            if verb != "remove":
                return HttpResponseRedirect(change_url)
            return TemplateResponse(
                request,
                "admin/workspaces/workspace/remove_confirmation.html",
                {
                    **self.admin_site.each_context(request),
                    "title": "Remove workspace?",
                    "opts": self.model._meta,
                    "workspaces": [workspace],
                    "change_url": change_url,
                    "bulk": False,
                },
            )
        if verb == "remove" and request.POST.get("confirm") != "yes":
            return HttpResponseRedirect(request.path)
        self.lifecycle_request(request, workspace, verb)
        return HttpResponseRedirect(change_url)

    def lifecycle_request(self, request: HttpRequest, workspace: Workspace, verb: str) -> bool:
        """One request through the services, with the admin as actor, in the admin log."""
        name = f"{workspace.owner.username}/{workspace.name}"
        try:
            REQUESTS[verb](workspace.id, actor=audit.admin(request.user))
        except (services.TransitionNotAllowed, services.LimitExceeded) as exc:
            self.message_user(request, f"{name}: {exc}", level=messages.WARNING)
            return False
        self.log_change(request, workspace, f"Requested {verb}")
        self.message_user(request, f"{verb.capitalize()} requested for {name}.")
        return True


@admin.register(WorkspaceEvent)
class WorkspaceEventAdmin(admin.ModelAdmin):
    class Media:
        css = {"all": ["workspaces/admin.css"]}

    list_display = [
        "created_at",
        "workspace_link",
        "owner",
        "type",
        "source",
        "actor",
        "generation",
        "payload_short",
    ]
    list_filter = [
        "type",
        "source",
        "created_at",
        ("workspace__owner", admin.RelatedOnlyFieldListFilter),
    ]
    search_fields = ["workspace__name", "=workspace__id", "actor", "workspace__owner__username"]
    list_select_related = ["workspace", "workspace__owner"]
    list_per_page = 100
    ordering = ["-id"]
    date_hierarchy = "created_at"

    @admin.display(description="workspace", ordering="workspace__name")
    def workspace_link(self, obj: WorkspaceEvent) -> SafeString:
        url = reverse("admin:workspaces_workspace_change", args=[obj.workspace_id])
        return format_html('<a href="{}">{}</a>', url, obj.workspace.name)

    @admin.display(description="owner", ordering="workspace__owner__username")
    def owner(self, obj: WorkspaceEvent) -> str:
        return obj.workspace.owner.username

    @admin.display(description="payload")
    def payload_short(self, obj: WorkspaceEvent) -> str:
        text = ", ".join(f"{key}={value}" for key, value in (obj.payload or {}).items())
        return text if len(text) <= 100 else text[:97] + "..."

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Users' API tokens: who has one and since when. Only a hash is stored, so there is no key
    to show; issue one with ``manage.py drf_create_token``, revoke by deleting the row."""

    list_display = ["fingerprint", "user", "created_at"]
    list_select_related = ["user"]
    search_fields = ["user__username"]
    fields = ["fingerprint", "user", "created_at"]
    readonly_fields = ["fingerprint", "user", "created_at"]
    ordering = ["-created_at"]

    @admin.display(description="fingerprint")
    def fingerprint(self, token: ApiToken) -> str:
        return f"sha256:{token.digest[:12]}…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
