"""The registry listener as it is served: ``gunicorn project.registry_asgi:application -k
uvicorn_worker.UvicornWorker`` (the ``registry`` line of the Procfile).

Workspaces can reach this port, so a workspace must not be able to take it away from the others.
Behind a threaded WSGI server it could: a thread reads each request from its socket, and a client
that connects and sends nothing, or headers without their body (or an agent stopped in the middle
of a call), holds that thread until it goes away; a handful of them stopped every agent's
heartbeat. Here the event loop reads every request, headers and body, whatever the number of
connections, and a request is handed to a thread (``REGISTRY_THREADS``, each with its own
database connection, as gunicorn's ``--threads`` ran it) only once it is whole: a body that does
not arrive within ``REQUEST_BODY_SECONDS`` is answered 408 and one larger than
``API_MAX_BODY_BYTES`` 413, from the event loop (``project.asgi_support.whole``). What the
thread runs is ``project.registry_wsgi``: the common heartbeat's one statement (``beat_reply``,
answered from here), else ``endpoints``, which serves the agent endpoints only.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from a2wsgi import WSGIMiddleware
from django.conf import settings

from project import registry_wsgi
from project.asgi_support import answer_lifespan, whole

# Whatever ``beat_reply`` left (here, not again in the thread) goes to the agent endpoints.
_threads = WSGIMiddleware(registry_wsgi.endpoints, workers=settings.REGISTRY_THREADS)  # type: ignore[arg-type]
# The heartbeat's own statement runs in a pool of its own, one hop from the event loop (the
# WSGI bridge takes several per request); each thread keeps its database connection.
_beats = ThreadPoolExecutor(settings.REGISTRY_THREADS, thread_name_prefix="registry-beat")
_BEAT_HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]


def _header(scope: dict[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return  # no websockets here
    request = await whole(receive, send)
    if request is None:
        return
    body, replay = request
    if scope.get("method") == "POST" and scope.get("path") == registry_wsgi.HEARTBEAT_PATH:
        reply = await asyncio.get_running_loop().run_in_executor(
            _beats,
            registry_wsgi.beat_reply,
            _header(scope, b"authorization"),
            _header(scope, b"content-type"),
            body,
        )
        if reply is not None:
            headers = [*_BEAT_HEADERS, (b"content-length", str(len(reply)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": reply})
            return
    await _threads(scope, replay, send)  # type: ignore[arg-type]
