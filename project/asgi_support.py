"""What the platform's two ASGI entry points (``project.asgi``, the API; ``project.registry_asgi``,
the agents' listener) share: the lifespan answer, reading a request whole on the event loop
before a thread gets it, and running a WSGI application on a fixed pool of threads.

A WSGI bridge whose input pulls the body from the event loop while the thread waits lets a
client that sends headers and then stalls (or sends its body a byte at a time) hold a thread for
as long as it likes, and a few of them would hold them all. ``whole`` reads the body first,
within ``REQUEST_BODY_SECONDS`` and at most ``API_MAX_BODY_BYTES``, answering 408 or 413 itself;
only a request that has arrived whole reaches a thread. ``in_thread`` then runs the WSGI
application there with that body and hands its whole answer back: one hop from the event loop
and one back (a bridge that streams takes several per request). Each thread of a pool keeps its
own persistent database connection (``CONN_MAX_AGE``), as gunicorn's threads did.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from a2wsgi.wsgi import build_environ
from django.conf import settings

Receive = Callable[[], Awaitable[dict[str, Any]]]
WSGIApplication = Callable[[dict[str, Any], Any], Any]
Response = tuple[int, list[tuple[bytes, bytes]], bytes]


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Acknowledge startup and shutdown at once (nothing is set up), so servers do not wait."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def refuse(send: Any, status: int, detail: str) -> None:
    """A JSON error answered from the event loop, in the API's shape (``detail``)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _read(receive: Receive, limit: int) -> bytes | None:
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


async def whole(receive: Receive, send: Any) -> bytes | None:
    """The request's body once all of it has arrived. None when the request is over already:
    the client left, or it was answered 408 (the body did not arrive within
    ``REQUEST_BODY_SECONDS``) or 413 (larger than ``API_MAX_BODY_BYTES``)."""
    seconds, limit = settings.REQUEST_BODY_SECONDS, settings.API_MAX_BODY_BYTES
    try:
        async with asyncio.timeout(seconds):
            return await _read(receive, limit)
    except TimeoutError:
        await refuse(send, 408, f"the request did not arrive whole within {seconds} s")
        return None
    except _TooLarge:
        await refuse(send, 413, f"the request body is larger than {limit} bytes")
        return None


def _respond(app: WSGIApplication, environ: dict[str, Any]) -> Response:
    """``app`` on a thread: its status, headers and whole body (what these applications answer
    outside the event streams is bounded: JSON, pages, static files)."""
    started: list[Any] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()  # Django's request_finished: the thread's connection ages as for any request
    status, headers = started
    encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    return int(status.split()[0]), encoded, b"".join(chunks)


async def in_thread(
    app: WSGIApplication, threads: ThreadPoolExecutor, scope: dict[str, Any], body: bytes, send: Any
) -> None:
    """Answer a request that has arrived whole (``whole``) with the WSGI ``app`` run on one of
    ``threads``."""
    environ: dict[str, Any] = dict(build_environ(scope, io.BytesIO(body)))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    status, headers, content = await loop.run_in_executor(threads, _respond, app, environ)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
