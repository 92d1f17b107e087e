"""Live logs: ``GET /api/workspaces/{id}/logs/stream/`` turns a backend's ``follow_logs`` into
Server-Sent Events.

Frames:

* ``data: {"line": "...", "truncated": false}``: one line of output (the default event type,
  so ``EventSource.onmessage`` gets it), the last ``tail`` first, then new ones as they come;
* ``event: instance`` + ``data: {"change": "exited" | "gone" | "started" | "restarted" |
  "truncated" | "skipped", "detail": "..."}``: what happened to the instance or its output; the
  stream goes on following (a new instance's output included);
* ``event: end`` + ``data: {"reason": "max_seconds" | "lease" | "error", "detail": "..."}``:
  the last frame. After ``max_seconds``, open a new stream with ``tail=0`` to go on.

Bounded like the event stream (``portal.live_events``, whose per-user places it shares the
mechanism of, with a cap of its own): at most ``LOGS_STREAM_MAX_SECONDS`` per stream and
``LOGS_STREAMS_PER_USER`` open streams per user; a line is cut to
``LOGS_STREAM_MAX_LINE_BYTES``; the tail is at most ``LOGS_MAX_TAIL`` lines and
``LOGS_MAX_BYTES``. Under the ASGI server the stream is a coroutine (no thread); under WSGI
(``runserver``) the same coroutine runs on an event loop of the request's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from portal.live_events import StreamSlot, open_frame
from provisioning.backends.base import (
    BackendError,
    InstanceNotice,
    LogItem,
    LogLine,
    WorkspaceBackend,
)
from provisioning.backends.follow import get_within

logger = logging.getLogger(__name__)
_DONE = object()


def _frame(data: dict[str, Any], event: str | None = None) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {body}\n\n".encode()


def frame_for(item: LogItem) -> bytes:
    if isinstance(item, LogLine):
        return _frame({"line": item.text, "truncated": item.truncated})
    return _frame({"change": item.change.value, "detail": item.detail}, "instance")


def _end(reason: str, detail: str = "") -> bytes:
    return _frame({"reason": reason, "detail": detail}, "end")


async def _pump(follower: AsyncIterator[LogItem], queue: asyncio.Queue[Any]) -> None:
    # Cancelled (the stream is closing and no longer reads the queue), it puts nothing more: on
    # a full queue, waiting to put the end mark would never end.
    try:
        async for item in follower:
            await queue.put(item)
    except BackendError as exc:
        await queue.put(exc)
    except Exception as exc:  # a follower's bug ends this stream, not the server's loop
        logger.exception("following logs failed")
        await queue.put(BackendError(f"following the output failed: {exc.__class__.__name__}"))
    await queue.put(_DONE)


async def astream(
    backend: WorkspaceBackend,
    workspace_id: UUID,
    *,
    tail: int,
    slot: StreamSlot | None = None,
    max_seconds: float | None = None,
    keepalive_seconds: float | None = None,
) -> AsyncGenerator[bytes]:
    """The SSE frames of one workspace's output; see the module's docstring."""
    max_seconds = float(max_seconds or settings.LOGS_STREAM_MAX_SECONDS)
    keepalive_seconds = float(keepalive_seconds or settings.EVENTS_STREAM_KEEPALIVE_SECONDS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=5)
    follower = backend.follow_logs(
        workspace_id,
        {},
        tail=min(tail, settings.LOGS_MAX_TAIL),
        max_bytes=settings.LOGS_MAX_BYTES,
        max_line_bytes=settings.LOGS_STREAM_MAX_LINE_BYTES,
        poll_seconds=settings.LOGS_FOLLOW_POLL_MS / 1000,
    )
    # The follower runs as a task of its own feeding a bounded queue: waiting on the queue can
    # time out (keepalive, renewal, the end) without interrupting the follower mid-read.
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
    pump = asyncio.create_task(_pump(follower, queue))
    reason, detail = "max_seconds", ""
    try:
        yield open_frame()
        last_sent = loop.time()
        while loop.time() < deadline:
            if slot is not None and slot.renew_due() and not await slot.arenew(client):
                reason = "lease"
                break
            now = loop.time()
            due = min(deadline, last_sent + keepalive_seconds)
            if slot is not None:
                due = min(due, now + slot.seconds_to_renewal())
            try:
                item = await get_within(queue, max(0.05, due - now))
            except TimeoutError:
                if loop.time() - last_sent >= keepalive_seconds:
                    yield b": keepalive\n\n"
                    last_sent = loop.time()
                continue
            if item is _DONE:
                reason = "error"
                break
            if isinstance(item, BackendError):
                reason, detail = "error", str(item)
                continue  # _DONE follows
            if isinstance(item, LogLine | InstanceNotice):
                yield frame_for(item)
                last_sent = loop.time()
        yield _end(reason, detail)
    except RedisError as exc:
        logger.warning("log stream ended: %s", exc)
    finally:
        # Shielded: a client that left cancels this task, and the slot must still be given back.
        await asyncio.shield(_aclose(pump, follower, client, slot))


async def _aclose(
    pump: asyncio.Task[None],
    follower: AsyncIterator[LogItem],
    client: aioredis.Redis,
    slot: StreamSlot | None,
) -> None:
    pump.cancel()
    with contextlib.suppress(asyncio.CancelledError, BackendError):
        await pump
    closer = getattr(follower, "aclose", None)
    if closer is not None:
        with contextlib.suppress(BackendError, RuntimeError):
            await closer()
    try:
        if slot is not None:
            await slot.arelease(client)
    finally:
        await client.aclose()


def stream(backend: WorkspaceBackend, workspace_id: UUID, **kwargs: Any) -> Iterator[bytes]:
    """``astream`` under a WSGI server: the same frames, on an event loop of the request's
    thread (which the stream holds, as every WSGI stream does)."""
    loop = asyncio.new_event_loop()
    frames = astream(backend, workspace_id, **kwargs)
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(frames))
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(frames.aclose())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
