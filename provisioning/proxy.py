"""The reverse proxy: Caddy, managed through its admin API (``PROXY_ADMIN``).

The only code that talks to the proxy. Its whole configuration is static (``base_config``): the
server ``workspaces`` listens on ``PROXY_BIND`` with **one route for every workspace**, matching
any host one label below ``WORKSPACE_DOMAIN``, and a catch-all 404 for other hosts. Nothing is
written to the proxy when a workspace starts, stops or moves: the platform's check, which the
proxy makes on every request anyway, names the workspace's upstream. So the proxy follows the
database exactly, with no route to write, delete or repair, and no reload of Caddy's
configuration per workspace (a reload costs in proportion to every route it holds).

The route (see ``workspace_route``):

1. ``X-Workspace-Upstream`` is deleted from the request: only the platform's answer sets it;
2. ``/_platform/*`` on a workspace host goes to the platform (the ticket exchange that sets the
   workspace cookie, ``portal.api.proxy_views``), with ``X-Workspace-Host`` set by the proxy;
3. everything else first asks the platform (``forward_auth``: a GET to ``/api/proxy/auth``
   carrying the request's headers, with ``X-Workspace-Host`` set to the request's host by the
   proxy, never by the client). A 2xx lets the request through and carries
   ``X-Workspace-Upstream`` (``host:port`` of the workspace's app, from its row), which is copied
   into the request; any other answer (401, 403, 404, a redirect to the login page) goes back to
   the client as it is;
4. then the app at that upstream, without the platform's credentials: ``Authorization`` and
   ``X-Workspace-Upstream`` are deleted and the platform's cookies are cut out of ``Cookie``
   (the app's own cookies stay).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from django.conf import settings

SERVER = "workspaces"
UPSTREAM_HEADER = "X-Workspace-Upstream"
AUTH_PATH = "/api/proxy/auth"
TICKET_PATH_PREFIX = "/_platform/"
_TIMEOUT = 5.0


class ProxyError(Exception):
    """The proxy could not be reached or refused a change."""


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


def workspace_route() -> dict[str, Any]:
    """The one route of every workspace host (see the module's docstring)."""
    platform = auth_upstream()
    # The platform sees its own host (ALLOWED_HOSTS); the workspace is named by the host the
    # client asked for, which the proxy passes on.
    to_platform = {
        "Host": [platform],
        "X-Workspace-Host": ["{http.request.host}"],
        "X-Forwarded-Host": ["{http.request.host}"],
    }
    cookies = "|".join(_platform_cookies())
    return {
        "match": [{"host": [f"*.{settings.WORKSPACE_DOMAIN}"]}],
        "terminal": True,
        "handle": [
            {
                "handler": "subroute",
                "routes": [
                    {"handle": [{"handler": "headers", "request": {"delete": [UPSTREAM_HEADER]}}]},
                    {
                        "match": [{"path": [f"{TICKET_PATH_PREFIX}*"]}],
                        "handle": [
                            {
                                "handler": "reverse_proxy",
                                "upstreams": [{"dial": platform}],
                                "headers": {"request": {"set": to_platform}},
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
                                            **to_platform,
                                            "X-Forwarded-Method": ["{http.request.method}"],
                                            "X-Forwarded-Uri": ["{http.request.uri}"],
                                        },
                                        # The check is a plain GET even for a WebSocket upgrade.
                                        "delete": ["Upgrade", "Connection"],
                                    }
                                },
                                "handle_response": [
                                    {
                                        "match": {"status_code": [2]},
                                        "routes": [
                                            {
                                                "handle": [
                                                    {
                                                        "handler": "headers",
                                                        "request": {
                                                            "set": {
                                                                UPSTREAM_HEADER: [
                                                                    "{http.reverse_proxy.header."
                                                                    f"{UPSTREAM_HEADER}}}"
                                                                ]
                                                            }
                                                        },
                                                    }
                                                ]
                                            }
                                        ],
                                    }
                                ],
                            },
                            {
                                "handler": "reverse_proxy",
                                # Resolved per request from the header the platform's answer set.
                                "upstreams": [
                                    {"dial": f"{{http.request.header.{UPSTREAM_HEADER}}}"}
                                ],
                                "headers": {
                                    "request": {
                                        "delete": ["Authorization", UPSTREAM_HEADER],
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
    """The proxy's whole configuration: the admin listener and the workspaces server (the route
    of every workspace host, then a catch-all 404). ``manage.py proxy_config`` prints it."""
    return {
        "admin": {"listen": settings.PROXY_ADMIN},
        "apps": {
            "http": {
                "servers": {
                    SERVER: {
                        "listen": [settings.PROXY_BIND],
                        "automatic_https": {"disable": True},
                        "routes": [
                            workspace_route(),
                            {
                                "handle": [
                                    {
                                        "handler": "static_response",
                                        "status_code": 404,
                                        "body": "no workspace is served at this address\n",
                                    }
                                ]
                            },
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
        raise ProxyError(f"proxy {method} {path}: {exc.code} {detail}") from None
    except (OSError, ValueError) as exc:
        raise ProxyError(
            f"cannot reach the proxy's admin API at {settings.PROXY_ADMIN}: {exc}"
        ) from exc
    return json.loads(raw) if raw.strip() else None


def ensure_config() -> bool:
    """Make the proxy serve ``base_config``: one read of its ``apps``; when the workspaces server
    is missing (a proxy started or restarted empty) or differs (the settings changed; an older
    configuration), load the whole configuration. Returns True when it had to load it."""
    wanted = base_config()
    served = _call("GET", "/config/apps/") or {}
    if (
        served.get("http", {}).get("servers", {}).get(SERVER)
        == wanted["apps"]["http"]["servers"][SERVER]
    ):
        return False
    _call("POST", "/load", wanted)
    return True
