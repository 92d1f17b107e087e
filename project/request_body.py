"""The one ASGI middleware in front of Django's handler: a request's body arrives whole, within
``REQUEST_BODY_SECONDS`` and at most ``API_MAX_BODY_BYTES``, or it is refused before Django reads
it.

Django's ASGI handler spools any body to a temporary file before it resolves the URL, and uvicorn
sets no limit on a body's size or on how long it may take: without this, a 1 GB body to any path
is written to disk before it is refused, and a client that sends its body a byte at a time keeps
its request open as long as it likes. A body announced larger than the limit is answered 413 at
once, unread; a chunked one as soon as it passes the limit; one that has not arrived in time 408.
The refusals are JSON in the API's shape (``detail``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.conf import settings

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


async def refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _announced_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            # More digits than any limit: no need to convert them.
            return int(value) if value.isdigit() and len(value) <= 18 else -1
    return None


async def _read(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class RequestBodyLimit:
    """Wraps an ASGI application; see the module's docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = settings.API_MAX_BODY_BYTES
        seconds: int = settings.REQUEST_BODY_SECONDS
        announced = _announced_length(scope)
        if announced is not None and (announced < 0 or announced > limit):
            await refuse(send, 413, f"the request body is larger than {limit} bytes")
            return
        try:
            async with asyncio.timeout(seconds):
                body = await _read(receive, limit)
        except TimeoutError:
            await refuse(send, 408, f"the request did not arrive whole within {seconds} s")
            return
        except _TooLarge:
            await refuse(send, 413, f"the request body is larger than {limit} bytes")
            return
        except _Gone:
            return
        delivered = False

        async def replay() -> Message:
            # The body once, whole; then the server's own messages (a stream listens for the
            # client's disconnect on them).
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
