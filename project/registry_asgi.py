"""The registry listener: ``gunicorn project.registry_asgi:application -k
uvicorn_worker.UvicornWorker`` (the ``registry`` line of the Procfile).

It listens where workspaces can connect (``REGISTRY_BIND``, e.g. ``0.0.0.0:8001``: loopback and
the workspaces' links), and ``PLATFORM_URL`` names it. It serves the agent's endpoints
(``/api/registry/*``) through Django's own ASGI handler and answers 404 to every other path
before Django sees it, so a workspace that reaches this port reaches nothing else of the API, the
admin or the docs. Bodies are bounded in size and time (``RequestBodyLimit``) as on the web port.
"""

from __future__ import annotations

import json
import os
import posixpath

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# As project.asgi: each request's sync part runs in a thread of its own, so connections come
# from psycopg's pool.
os.environ.setdefault("DATABASE_POOL", "true")
os.environ.setdefault("DATABASE_APPLICATION_NAME", "registry")

from django.conf import settings
from django.core.asgi import get_asgi_application

from project import warmup
from project.request_body import ASGIApp, Receive, RequestBodyLimit, Scope, Send

REGISTRY_PREFIX = "/api/registry/"
_NOT_FOUND = json.dumps(
    {"detail": "not found: this listener serves only the agent endpoints (/api/registry/*)"}
).encode()


def _host_for_django() -> bytes:
    """Agents call whatever address reaches the host from their network (a link's gateway, which
    no ALLOWED_HOSTS lists); the agent's bearer token, not the Host header, is what the registry
    trusts, so requests reach Django under an allowed host name."""
    for host in settings.ALLOWED_HOSTS:
        name = host.lstrip(".")
        if name and name != "*":
            return name.encode()
    return b"localhost"


class AgentEndpointsOnly:
    """``/api/registry/*`` to Django, under the normalised path (``/api/registry/../workspaces/``
    cannot slip through) and an allowed Host; a JSON 404 for any other path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.host = _host_for_django()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = posixpath.normpath(scope.get("path") or "/")
        if not path.startswith(REGISTRY_PREFIX):
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_NOT_FOUND)).encode()),
            ]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": _NOT_FOUND})
            return
        headers = [(name, value) for name, value in scope["headers"] if name != b"host"]
        inner = {**scope, "path": path, "raw_path": path.encode(), "headers": headers}
        inner["headers"].append((b"host", self.host))
        await self.app(inner, receive, send)


application = RequestBodyLimit(AgentEndpointsOnly(get_asgi_application()))
warmup.events()
