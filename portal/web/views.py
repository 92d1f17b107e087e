"""Dashboard views: thin, like the API's. Reads through selectors, writes through the services
(actor ``user:<username>``); the live parts (status, events, log tail) are filled in by
``static/workspaces/dashboard.js`` from the API and the event stream."""

from __future__ import annotations

from typing import cast
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from portal.admin import STATUS_COLOURS
from portal.web.forms import CreateWorkspaceForm
from workspaces import audit, selectors, services
from workspaces.manifests import templates
from workspaces.models import Workspace, WorkspaceEvent

# The dashboard's buttons (removal has its own confirmation page).
REQUESTS = {verb: services.LIFECYCLE_REQUESTS[verb] for verb in ("start", "stop", "restart")}


def _workspace(request: HttpRequest, workspace_id: UUID) -> Workspace:
    workspace = (
        selectors.visible_workspaces(request.user)
        .select_related("owner")
        .filter(id=workspace_id)
        .first()
    )
    if workspace is None:
        raise Http404("no such workspace")
    return workspace


def _last_event_id() -> int:
    last = WorkspaceEvent.objects.order_by("-id").values_list("id", flat=True).first()
    return int(last or 0)


@login_required
@require_http_methods(["GET", "POST"])
def index(request: HttpRequest) -> HttpResponse:
    user = cast(User, request.user)
    form = CreateWorkspaceForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        manifest = templates().get(data["template"])
        fields = {"owner": user, "name": data["name"], "template": data["template"]}
        try:
            if manifest is not None and manifest.is_team:
                workspace = services.create_team(
                    **fields, env=data["env"], actor=audit.user(user)
                ).parent
            else:
                workspace = services.create_workspace(
                    **fields, env=data["env"], actor=audit.user(user)
                )
        except services.InvalidInput as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        except services.LimitExceeded as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"{workspace.name} is being provisioned.")
            return redirect("dashboard:workspace", workspace_id=workspace.id)
    if form.is_bound:
        # Env values are write-only: a form shown again never echoes them back.
        data = cast(QueryDict, form.data).copy()
        data["env"] = ""
        form.data = data
    workspaces = selectors.list_workspaces(user, owner=user.username, ordering="name")
    return render(
        request,
        "workspaces/index.html",
        {
            "workspaces": workspaces,
            "form": form,
            "last_event_id": _last_event_id(),
            "status_colours": STATUS_COLOURS,
        },
    )


@login_required
def workspace_page(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    workspace = _workspace(request, workspace_id)
    events = list(selectors.workspace_events(workspace.id).order_by("-id")[:100])
    events.reverse()
    members = selectors.visible_workspaces(request.user).filter(parent_id=workspace.id)
    return render(
        request,
        "workspaces/workspace.html",
        {
            "workspace": workspace,
            "events": events,
            "members": members,
            # The page's stream carries this workspace's (and its members') events only; one
            # workspace's events are recorded in id order, so resuming after the last one shown
            # misses none. (The newest id of all workspaces could be one whose transaction
            # committed before an older id of this one: that event would never be shown.)
            "last_event_id": events[-1].id if events else 0,
        },
    )


@login_required
@require_POST
def lifecycle(request: HttpRequest, workspace_id: UUID, verb: str) -> HttpResponse:
    workspace = _workspace(request, workspace_id)
    if verb not in REQUESTS:
        raise Http404("no such action")
    try:
        REQUESTS[verb](workspace.id, actor=audit.user(request.user))
    except (services.TransitionNotAllowed, services.LimitExceeded) as exc:
        messages.warning(request, f"{workspace.name}: {exc}")
    else:
        messages.info(request, f"{verb.capitalize()} requested for {workspace.name}.")
    target = request.POST.get("next", "")
    # Only back to a page of this site: never an open redirect.
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        target = "dashboard:index"
    return redirect(target or "dashboard:index")


@login_required
@require_http_methods(["GET", "POST"])
def remove(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    workspace = _workspace(request, workspace_id)
    if request.method == "POST":
        try:
            services.request_remove(workspace.id, actor=audit.user(request.user))
        except (services.TransitionNotAllowed, services.LimitExceeded) as exc:
            messages.warning(request, f"{workspace.name}: {exc}")
        else:
            messages.info(request, f"{workspace.name} is being removed.")
        return redirect("dashboard:index")
    return render(request, "workspaces/remove.html", {"workspace": workspace})
