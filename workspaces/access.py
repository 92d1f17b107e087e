"""Who may reach a workspace's app through the proxy, and the browser handshake that proves it.

Each workspace is served at its own host (``<name>--<owner>.<WORKSPACE_DOMAIN>``), a browser
origin of its own, so the app's JavaScript never shares an origin with the platform's API, its
session or its CSRF cookie. The platform's session cookie is therefore not sent to the
workspace host; a browser gets in by a handshake:

1. the proxy asks ``/api/proxy/auth`` (forward_auth) on every request, naming the host the
   request was sent to (``X-Workspace-Host``); the platform finds the workspace by its
   ``subdomain`` column and answers with where its app listens (``X-Workspace-Upstream``), so the
   proxy needs no route per workspace. A browser without the workspace cookie is redirected to
   ``/workspaces/<id>/open`` on the platform;
2. that page requires a platform login (``LOGIN_URL``), checks owner-or-staff, and redirects to
   ``<workspace host>/_platform/session?ticket=…``: a ticket signed with the platform's secret,
   bound to the user and the workspace, valid ``WORKSPACE_TICKET_MAX_AGE_SECONDS`` and once;
3. on the workspace host the platform exchanges the ticket for the workspace cookie: signed,
   host-only, HttpOnly, SameSite=Lax, bound to the user, the workspace and the user's password
   hash (a password change ends it) and issued after the user's last logout (a logout ends
   every workspace cookie of that user: ``end_workspace_sessions``).

API clients send ``Authorization: Token <key>`` to the workspace host instead. The proxy strips
both credentials before the app sees the request.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core import signing

from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.status import WorkspaceStatus

_LABEL_RE = re.compile(r"[^a-z0-9-]+")
_TICKET_SALT = "workspaces.access.ticket"
_COOKIE_SALT = "workspaces.access.cookie"


@dataclass(frozen=True)
class Grant:
    user_id: int
    workspace_id: str


def owner_label(username: str) -> str:
    """The owner's part of a workspace host name: a DNS label from the username."""
    return _LABEL_RE.sub("-", username.lower()).strip("-")[:63] or "user"


def subdomain(name: str, username: str) -> str:
    """The first label of the host a workspace's app is served at (``Workspace.subdomain``)."""
    return f"{name}--{owner_label(username)}"


def workspace_host(workspace: Workspace) -> str:
    return f"{workspace.subdomain}.{settings.WORKSPACE_DOMAIN}"


def workspace_for_host(host: str | None) -> Workspace | None:
    """The live workspace served at ``host`` (the proxy's ``X-Workspace-Host``, the request's
    Host header with any port cut off), or None. Two owners whose names map to one label share
    a host name: the workspace created first is served there (the platform still checks every
    request against the workspace found, so nobody enters another owner's workspace)."""
    name = (host or "").partition(":")[0].lower()  # a host name has no colon but the port's
    label, dot, domain = name.partition(".")
    if not label or not dot or domain != str(settings.WORKSPACE_DOMAIN).lower():
        return None
    return (
        Workspace.objects.select_related("owner")
        .defer("env")
        .exclude(status=WorkspaceStatus.REMOVED)
        .filter(subdomain=label)
        .order_by("created_at")
        .first()
    )


def workspace_for_proxy(workspace_id: str | None) -> Workspace | None:
    """The workspace an ``open`` link names by id, or None (never a warm pool's member)."""
    try:
        key = UUID(str(workspace_id))
    except ValueError:
        return None
    return (
        Workspace.objects.select_related("owner")
        .defer("env", "backend_state")
        .exclude(status=WorkspaceStatus.REMOVED)
        .filter(id=key, pool="")
        .first()
    )


def may_enter(user: AbstractBaseUser | AnonymousUser, workspace: Workspace) -> bool:
    """Only the owner and staff reach a workspace's app."""
    if not user.is_authenticated or not getattr(user, "is_active", False):
        return False
    return bool(getattr(user, "is_staff", False) or workspace.owner_id == user.pk)


def _user_hash(user: Any) -> str:
    return str(user.get_session_auth_hash())[:20]


def issue_ticket(user: Any, workspace: Workspace) -> str:
    return signing.dumps(
        {"u": user.pk, "w": str(workspace.id), "n": secrets.token_urlsafe(16)}, salt=_TICKET_SALT
    )


def redeem_ticket(ticket: str, workspace: Workspace) -> Any | None:
    """The user a valid, unused ticket for ``workspace`` was issued to, or None. Each ticket is
    accepted once (its nonce is remembered in Redis for longer than its validity)."""
    max_age = settings.WORKSPACE_TICKET_MAX_AGE_SECONDS
    try:
        data = signing.loads(ticket, salt=_TICKET_SALT, max_age=max_age)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("w") != str(workspace.id):
        return None
    first_use = get_redis().set(
        f"{settings.GATE_KEY_PREFIX}:ticket:{data.get('n')}", "1", nx=True, ex=max_age * 2
    )
    if not first_use:
        return None
    user = get_user_model().objects.filter(pk=data["u"], is_active=True).first()
    return user if user is not None and may_enter(user, workspace) else None


def cookie_value(user: Any, workspace: Workspace) -> str:
    issued = time.time()
    return signing.dumps(
        {"u": user.pk, "w": str(workspace.id), "h": _user_hash(user), "t": issued},
        salt=_COOKIE_SALT,
    )


def _logout_key(user_pk: Any) -> str:
    return f"{settings.GATE_KEY_PREFIX}:logout:{user_pk}"


def end_workspace_sessions(user: Any) -> None:
    """The user logged out of the platform: every workspace cookie issued to them before now is
    refused (the cookies live on the workspaces' hosts, where the logout cannot delete them).
    Remembered as long as such a cookie could live."""
    get_redis().set(
        _logout_key(user.pk), repr(time.time()), ex=settings.WORKSPACE_COOKIE_MAX_AGE_SECONDS
    )


def on_user_logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Django's ``user_logged_out`` signal (connected in ``WorkspacesConfig.ready``)."""
    if user is not None:
        end_workspace_sessions(user)


def _issued_before_logout(data: dict[str, Any]) -> bool:
    ended: Any = get_redis().get(_logout_key(data["u"]))
    try:
        return ended is not None and float(data.get("t", 0)) <= float(ended)
    except (TypeError, ValueError):
        return True


def user_from_cookie(value: str, workspace_id: str) -> Any | None:
    """The user a workspace cookie names, if it is valid for this workspace and still current."""
    try:
        data = signing.loads(
            value, salt=_COOKIE_SALT, max_age=settings.WORKSPACE_COOKIE_MAX_AGE_SECONDS
        )
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("w") != str(workspace_id):
        return None
    if _issued_before_logout(data):
        return None
    user = get_user_model().objects.filter(pk=data["u"], is_active=True).first()
    if user is None or not hmac.compare_digest(str(data.get("h")), _user_hash(user)):
        return None
    return user


def safe_next(value: str | None) -> str:
    """A path on the same host to return to (never another host)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value
