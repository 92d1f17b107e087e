"""The reverse proxy: Caddy, managed through its admin API (``PROXY_ADMIN``).

The only code that talks to the proxy. Caddy keeps its configuration in memory and changes it
atomically per request; every workspace route carries ``@id: ws-<workspace id>``, so a route is
read, replaced or deleted by id (``/id/<id>``) without knowing where it sits. The server
``workspaces`` listens on ``PROXY_BIND``; its last route is a catch-all 404, and workspace routes
are inserted at index 0, before it. Host matchers are exclusive, so the order of workspace
routes does not matter.

A workspace route (see ``route_for``):

1. ``/_platform/*`` on the workspace host goes to the platform (the ticket exchange that sets the
   workspace cookie, ``workspaces.api.proxy_auth``);
2. everything else first asks the platform (``forward_auth``: a GET to
   ``/api/proxy/auth`` carrying the request's headers, with ``X-Workspace-Id`` set by the route,
   never by the client); a 2xx lets the request through, any other answer (401, 403, a redirect to
   the login page) goes back to the client as it is;
3. then the app, without the platform's credentials: ``Authorization`` is deleted and the
   platform's cookies are cut out of ``Cookie`` (the app's own cookies stay).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from django.conf import settings

SERVER = "workspaces"
ROUTE_PREFIX = "ws-"
AUTH_PATH = "/api/proxy/auth"
TICKET_PATH_PREFIX = "/_platform/"
_TIMEOUT = 5.0


class ProxyError(Exception):
    """The proxy could not be reached or refused a change."""


def route_id(workspace_id: object) -> str:
    return f"{ROUTE_PREFIX}{workspace_id}"


def auth_upstream() -> str:
    """``host:port`` where the proxy reaches the platform's web process (``PROXY_AUTH_UPSTREAM``,
    or the host and port of ``PLATFORM_PUBLIC_URL``)."""
    if settings.PROXY_AUTH_UPSTREAM:
        return str(settings.PROXY_AUTH_UPSTREAM)
    parsed = urllib.parse.urlsplit(settings.PLATFORM_PUBLIC_URL)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.hostname}:{port}"


def _platform_cookies() -> list[str]:
    return [
        settings.WORKSPACE_COOKIE_NAME,
        settings.SESSION_COOKIE_NAME,
        settings.CSRF_COOKIE_NAME,
    ]


def route_for(workspace_id: object, host: str, upstream: str, generation: int) -> dict[str, Any]:
    """The Caddy route of one workspace: ``host`` to the app at ``upstream``, behind the
    platform's check. ``generation`` is recorded in the route so a route left by an older cycle
    differs from the one the current cycle wants."""
    platform = auth_upstream()
    # The platform sees its own host (ALLOWED_HOSTS); the workspace is named by the route.
    to_platform = {
        "set": {
            "Host": [platform],
            "X-Workspace-Id": [str(workspace_id)],
            "X-Forwarded-Host": ["{http.request.host}"],
        }
    }
    cookies = "|".join(_platform_cookies())
    return {
        "@id": route_id(workspace_id),
        "match": [{"host": [host]}],
        "terminal": True,
        "handle": [
            {
                "handler": "subroute",
                "routes": [
                    {
                        "match": [{"path": [f"{TICKET_PATH_PREFIX}*"]}],
                        "handle": [
                            {
                                "handler": "reverse_proxy",
                                "upstreams": [{"dial": platform}],
                                "headers": {"request": to_platform},
                            }
                        ],
                        "terminal": True,
                    },
                    {
                        "handle": [
                            {
                                # forward_auth, as Caddy's Caddyfile adapter expands it.
                                "handler": "reverse_proxy",
                                "upstreams": [{"dial": platform}],
                                "rewrite": {"method": "GET", "uri": AUTH_PATH},
                                "headers": {
                                    "request": {
                                        "set": {
                                            **to_platform["set"],
                                            "X-Forwarded-Method": ["{http.request.method}"],
                                            "X-Forwarded-Uri": ["{http.request.uri}"],
                                            "X-Workspace-Generation": [str(generation)],
                                        },
                                        # The check is a plain GET even for a WebSocket upgrade.
                                        "delete": ["Upgrade", "Connection"],
                                    }
                                },
                                "handle_response": [
                                    {
                                        "match": {"status_code": [2]},
                                        "routes": [{"handle": [{"handler": "headers"}]}],
                                    }
                                ],
                            },
                            {
                                "handler": "reverse_proxy",
                                "upstreams": [{"dial": upstream}],
                                "headers": {
                                    "request": {
                                        "delete": ["Authorization"],
                                        "replace": {
                                            "Cookie": [
                                                {
                                                    "search_regexp": (
                                                        rf"(^|;\s*)({cookies})=[^;]*"
                                                    ),
                                                    "replace": "",
                                                }
                                            ]
                                        },
                                    }
                                },
                            },
                        ],
                    },
                ],
            }
        ],
    }


def base_config() -> dict[str, Any]:
    """The whole configuration of an empty proxy: the admin listener, the workspaces server with
    only its catch-all route."""
    return {
        "admin": {"listen": settings.PROXY_ADMIN},
        "apps": {
            "http": {
                "servers": {
                    SERVER: {
                        "listen": [settings.PROXY_BIND],
                        "automatic_https": {"disable": True},
                        "routes": [
                            {
                                "handle": [
                                    {
                                        "handler": "static_response",
                                        "status_code": 404,
                                        "body": "no workspace is served at this address\n",
                                    }
                                ]
                            }
                        ],
                    }
                }
            }
        },
    }


def _call(method: str, path: str, body: Any = None) -> Any:
    url = f"http://{settings.PROXY_ADMIN}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    # Caddy refuses admin requests whose Origin/Host it does not expect; ours is the listener.
    request.add_header("Origin", f"http://{settings.PROXY_ADMIN}")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise ProxyHTTPError(exc.code, f"proxy {method} {path}: {exc.code} {detail}") from None
    except (OSError, ValueError) as exc:
        raise ProxyError(
            f"cannot reach the proxy's admin API at {settings.PROXY_ADMIN}: {exc}"
        ) from exc
    return json.loads(raw) if raw.strip() else None


class ProxyHTTPError(ProxyError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def ensure_server() -> bool:
    """Load the base configuration if the workspaces server is missing (a proxy started or
    restarted empty). Returns True when it had to."""
    return ensure_server_and_list()[0]


def list_routes() -> dict[str, dict[str, Any]]:
    """Every workspace route the proxy serves, by ``@id`` (one request)."""
    return _workspace_routes(_apps())


def ensure_server_and_list() -> tuple[bool, dict[str, dict[str, Any]]]:
    """``ensure_server`` and ``list_routes`` with one read of the configuration: whether the
    base configuration had to be loaded (then there is no route), and the routes."""
    apps = _apps()
    if SERVER in apps.get("http", {}).get("servers", {}):
        return False, _workspace_routes(apps)
    _call("POST", "/load", base_config())
    return True, {}


def _apps() -> dict[str, Any]:
    # From /config/apps/: a path below a missing object is an error, and a proxy restarted empty
    # has no http app at all (then there is no route).
    return _call("GET", "/config/apps/") or {}


def _workspace_routes(apps: dict[str, Any]) -> dict[str, dict[str, Any]]:
    routes = apps.get("http", {}).get("servers", {}).get(SERVER, {}).get("routes") or []
    return {
        route["@id"]: route
        for route in routes
        if isinstance(route, dict) and str(route.get("@id", "")).startswith(ROUTE_PREFIX)
    }


def put_route(route: dict[str, Any]) -> None:
    """Create or replace the route with ``route['@id']``. Idempotent."""
    try:
        _call("PATCH", f"/id/{route['@id']}", route)
        return
    except ProxyHTTPError as exc:
        if exc.status != 404:
            raise
    # A new route. Index 0: before the catch-all. Only when the insert fails is the configuration
    # read (the whole of it, every route): a proxy started or restarted empty has no server yet.
    insert = f"/config/apps/http/servers/{SERVER}/routes/0"
    try:
        _call("PUT", insert, route)
    except ProxyHTTPError:
        if not ensure_server():
            raise
        _call("PUT", insert, route)


def delete_route(workspace_id: object) -> bool:
    """Delete the workspace's route; True if there was one. Not found means done."""
    try:
        _call("DELETE", f"/id/{route_id(workspace_id)}")
    except ProxyHTTPError as exc:
        if exc.status == 404:
            return False
        raise
    return True
