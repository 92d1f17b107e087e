"""What the platform's two ASGI entry points (``project.asgi``, the API; ``project.registry_asgi``,
the agents' listener) share: the lifespan answer, and reading a request whole on the event loop
before a thread gets it.

Both hand ordinary requests to a fixed pool of threads through ``a2wsgi``, whose WSGI input pulls
the body from the event loop while the thread waits: a client that sends headers and then stalls
(or sends its body a byte at a time) would hold a thread for as long as it likes, and a few of
them would hold them all. ``whole`` reads the body first, within ``REQUEST_BODY_SECONDS`` and at
most ``API_MAX_BODY_BYTES``, answering 408 or 413 itself; only a request that has arrived whole
reaches a thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

Receive = Callable[[], Awaitable[dict[str, Any]]]


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


async def whole(receive: Receive, send: Any) -> tuple[bytes, Receive] | None:
    """The request's body once all of it has arrived, and a ``receive`` that gives it, whole, to
    whoever reads the request next (then passes on what the client does, i.e. leaving). None
    when the request is over already: the client left, or it was answered 408 (the body did not
    arrive within ``REQUEST_BODY_SECONDS``) or 413 (larger than ``API_MAX_BODY_BYTES``)."""
    seconds, limit = settings.REQUEST_BODY_SECONDS, settings.API_MAX_BODY_BYTES
    try:
        async with asyncio.timeout(seconds):
            body = await _read(receive, limit)
    except TimeoutError:
        await refuse(send, 408, f"the request did not arrive whole within {seconds} s")
        return None
    except _TooLarge:
        await refuse(send, 413, f"the request body is larger than {limit} bytes")
        return None
    if body is None:
        return None
    delivered = False

    async def replay() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
