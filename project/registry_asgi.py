"""The registry listener as it is served: ``gunicorn project.registry_asgi:application -k
uvicorn_worker.UvicornWorker`` (the ``registry`` line of the Procfile).

Workspaces can reach this port, so a workspace must not be able to take it away from the others.
Behind a threaded WSGI server it could: a thread reads each request from its socket, and a client
that connects and sends nothing, or headers without their body (or an agent stopped in the middle
of a call), holds that thread until it goes away; a handful of them stopped every agent's
heartbeat. Here the event loop reads every request, headers and body, whatever the number of
connections, and a request is handed to a thread (``REGISTRY_THREADS``, each with its own
database connection, as gunicorn's ``--threads`` ran it) only once it is whole: a body that does
not arrive within ``REGISTRY_BODY_SECONDS`` is answered 408 and one larger than
``API_MAX_BODY_BYTES`` 413, from the event loop. What the thread runs is
``project.registry_wsgi``: the common heartbeat's one statement (``beat_reply``, answered from
here), else the WSGI application, which serves the agent endpoints and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from a2wsgi import WSGIMiddleware
from django.conf import settings

from project import registry_wsgi
from project.lifespan import answer_lifespan

_threads = WSGIMiddleware(registry_wsgi.application, workers=settings.REGISTRY_THREADS)  # type: ignore[arg-type]
# The heartbeat's own statement runs in a pool of its own, one hop from the event loop (the
# WSGI bridge takes several per request); each thread keeps its database connection.
_beats = ThreadPoolExecutor(settings.REGISTRY_THREADS, thread_name_prefix="registry-beat")
_BEAT_HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]


def _header(scope: dict[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _whole_body(receive: Any, limit: int) -> bytes | None:
    """The request's body once all of it has arrived (None: the client went away); raises
    ``_TooLarge`` as soon as it grows past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return  # no websockets here
    seconds = settings.REGISTRY_BODY_SECONDS
    limit = settings.API_MAX_BODY_BYTES
    try:
        async with asyncio.timeout(seconds):
            body = await _whole_body(receive, limit)
    except TimeoutError:
        await _refuse(send, 408, f"the request did not arrive whole within {seconds} s")
        return
    except _TooLarge:
        await _refuse(send, 413, f"the request body is larger than {limit} bytes")
        return
    if body is None:
        return
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
    delivered = False

    async def replay() -> dict[str, Any]:
        """The body, whole, to the thread; then whatever the client does next (leaving)."""
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    await _threads(scope, replay, send)  # type: ignore[arg-type]
