"""The registry listener: the only platform endpoint workspaces can reach.

A second WSGI entry point that serves ``/api/registry/*`` (the agent's calls) and answers 404 to
every other path before Django sees it, so a workspace that reaches this port reaches nothing
else of the API, the admin or the docs. It listens where workspaces can connect (``REGISTRY_BIND``,
e.g. ``0.0.0.0:8001``: the Docker networks' gateways and loopback), and ``PLATFORM_URL`` names it;
the full API stays on the web listener, which workspaces cannot reach.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
_django = get_wsgi_application()


def _host_for_django() -> str:
    """Agents call whatever address reaches the host from their network (a Docker gateway such
    as 172.30.0.1, which no ALLOWED_HOSTS lists); the agent's bearer token, not the Host header,
    is what the registry trusts, so requests reach Django under an allowed host name."""
    for host in settings.ALLOWED_HOSTS:
        name = host.lstrip(".")
        if name and name != "*":
            return name
    return "localhost"


_HOST = _host_for_django()
REGISTRY_PREFIX = "/api/registry/"
_NOT_FOUND = json.dumps(
    {"detail": "not found: this listener serves only the agent endpoints (/api/registry/*)"}
).encode()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = os.path.normpath(environ.get("PATH_INFO") or "/")
    if path.startswith(REGISTRY_PREFIX):
        # The normalised path, so /api/registry/../workspaces/ cannot slip through.
        environ["PATH_INFO"] = path
        environ["HTTP_HOST"] = _HOST
        return _django(environ, start_response)
    start_response(
        "404 Not Found",
        [("Content-Type", "application/json"), ("Content-Length", str(len(_NOT_FOUND)))],
    )
    return [_NOT_FOUND]
