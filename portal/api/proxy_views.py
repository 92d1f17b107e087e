"""The proxy's questions and the browser handshake (see ``workspaces.access``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema
from rest_framework import authentication, exceptions
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.authentication import ApiTokenAuthentication
from provisioning import proxy, routes
from provisioning.backends.base import BackendError
from workspaces import access, services
from workspaces.models import Workspace


class _JsonWhateverAccepted(BaseContentNegotiation):
    """Browsers ask for text/html: they get a redirect, errors stay JSON (never a 406)."""

    def select_parser(self, request: Request, parsers: Any) -> Any:
        return parsers[0] if parsers else None

    def select_renderer(
        self, request: Request, renderers: Any, format_suffix: str | None = None
    ) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type


def _workspace(request: HttpRequest) -> Workspace | None:
    """The workspace served at the host the proxy names (``X-Workspace-Host``: the host the
    client asked for, set by the proxy's route), read once per request."""
    if not hasattr(request, "_proxied_workspace"):
        host = request.headers.get("X-Workspace-Host")
        request._proxied_workspace = access.workspace_for_host(host)  # type: ignore[attr-defined]
    return request._proxied_workspace  # type: ignore[attr-defined]


class WorkspaceCookieAuthentication(authentication.BaseAuthentication):
    """The signed, host-only cookie the handshake set on the workspace host."""

    def authenticate(self, request: Request) -> tuple[Any, None] | None:
        value = request.COOKIES.get(settings.WORKSPACE_COOKIE_NAME)
        workspace = _workspace(request._request) if value else None
        if not value or workspace is None:
            return None
        user = access.user_from_cookie(value, str(workspace.id))
        return (user, None) if user is not None else None


def _wants_html(request: HttpRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _platform_url(path: str) -> str:
    base = settings.PLATFORM_PUBLIC_URL
    return f"{base.rstrip('/')}{path}"


@extend_schema(exclude=True)
class ProxyAuthView(APIView):
    """``forward_auth``: may this request reach the workspace served at ``X-Workspace-Host``?

    204 with ``X-Workspace-Upstream`` (where the proxy reaches the app now): yes (owner or staff).
    404: no workspace is served at that host now (none, or its app is not up). A browser without
    credentials: 302 to the platform's open page (login, then the handshake). An API client
    without credentials: 401. Anyone else: 403."""

    authentication_classes = [
        ApiTokenAuthentication,
        WorkspaceCookieAuthentication,
    ]
    permission_classes = [AllowAny]
    content_negotiation_class = _JsonWhateverAccepted

    def get(self, request: Request) -> Response | HttpResponse:
        workspace = _workspace(request._request)
        try:
            upstream = routes.upstream(workspace) if workspace is not None else None
        except BackendError as exc:
            return Response({"detail": f"the workspace's backend is unavailable: {exc}"}, 503)
        if workspace is None or upstream is None:
            # As the proxy's own catch-all: nothing is served at this address now.
            return Response({"detail": "no workspace is served at this address"}, status=404)
        if access.may_enter(request.user, workspace):
            # A request through the proxy is activity (the idle auto-stop policy): rate-limited
            # in Redis, so most calls write nothing.
            services.record_activity(workspace.id, "proxy")
            return Response(status=204, headers={proxy.UPSTREAM_HEADER: upstream})
        if request.user.is_authenticated:
            return Response({"detail": "this workspace belongs to someone else"}, status=403)
        if _wants_html(request):
            back = access.safe_next(request.headers.get("X-Forwarded-Uri"))
            query = urlencode({"next": back})
            return HttpResponseRedirect(_platform_url(f"/workspaces/{workspace.id}/open?{query}"))
        raise exceptions.NotAuthenticated("log in, or send Authorization: Token <key>")


@require_GET
@login_required
def open_workspace(request: HttpRequest, workspace_id: str) -> HttpResponse:
    """On the platform's host, with its login: send the browser to the workspace host with a
    one-time ticket."""
    workspace = access.workspace_for_proxy(workspace_id)
    if workspace is None or not access.may_enter(request.user, workspace):
        # Another owner's workspace is not shown to exist (as in the API).
        return JsonResponse({"detail": "Not found."}, status=404)
    url = routes.workspace_url(workspace)
    if url is None:
        return JsonResponse(
            {"detail": f"the workspace has no url while it is {workspace.status}"}, status=409
        )
    query = urlencode(
        {
            "ticket": access.issue_ticket(request.user, workspace),
            "next": access.safe_next(request.GET.get("next")),
        }
    )
    return HttpResponseRedirect(f"{url.rstrip('/')}/_platform/session?{query}")


@require_GET
def workspace_session(request: HttpRequest) -> HttpResponse:
    """On the workspace host (the proxy forwards ``/_platform/*`` here and names the workspace):
    exchange a ticket for the workspace cookie."""
    workspace = _workspace(request)
    if workspace is None:
        return JsonResponse({"detail": "no such workspace"}, status=404)
    user = access.redeem_ticket(request.GET.get("ticket", ""), workspace)
    if user is None:
        return JsonResponse(
            {"detail": "the ticket is invalid, expired or already used"}, status=403
        )
    response = HttpResponseRedirect(access.safe_next(request.GET.get("next")))
    # Host-only (no Domain): the cookie goes to this workspace's host and nowhere else.
    response.set_cookie(
        settings.WORKSPACE_COOKIE_NAME,
        access.cookie_value(user, workspace),
        max_age=settings.WORKSPACE_COOKIE_MAX_AGE_SECONDS,
        httponly=True,
        samesite="Lax",
        secure=settings.WORKSPACE_URL_SCHEME == "https",
    )
    return response
