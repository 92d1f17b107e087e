"""Live events: every recorded event is published on Redis pub/sub once committed
(``workspaces.event_channel``), and ``GET /api/events/stream`` turns the caller's share of them
into Server-Sent Events.

Channels: one per owner (``<EVENTS_CHANNEL_PREFIX>:owner:<user id>``); a non-staff stream
subscribes to its owner's channel only, so it never receives another owner's events; a staff
stream subscribes to the pattern of all owners.

A stream subscribes *before* it replays from the database (events with an id above
``Last-Event-ID``), so an event committed during the replay arrives live; one that is both
replayed and heard live is sent once. Pub/sub is lossy by design (a subscriber that is not
connected hears nothing), which is why resuming always goes through the database.

Two ways to serve a stream: ``astream`` (an async iterator) under the ASGI server that ``bin/run``
starts, where an open stream is a coroutine waiting on Redis and holds no thread; and ``stream``
(a generator) under a WSGI server such as ``runserver``, where it holds one thread. Either way a
user has at most ``EVENTS_STREAMS_PER_USER`` open streams (``StreamSlots``, counted in Redis so
the cap holds across processes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from redis.exceptions import RedisError

from workspaces import selectors
from workspaces.event_channel import event_data, owner_channel
from workspaces.redis_client import get_redis

logger = logging.getLogger(__name__)
REPLAY_BATCH = 500
# Poll granularity of the live loop: bounds how late a keepalive or the end of the stream is.
_POLL_SECONDS = 1.0


def _all_owners_pattern() -> str:
    return f"{settings.EVENTS_CHANNEL_PREFIX}:owner:*"


def sse_message(data: dict[str, Any]) -> bytes:
    return f"id: {data['id']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _frames_after(
    user: AbstractBaseUser | AnonymousUser, cursor: int, scope: frozenset[str] | None
) -> list[tuple[int, bytes]]:
    """One replay batch: (id, frame) of the caller's events (of the workspaces in ``scope`` only,
    when given) with an id above ``cursor``."""
    events = selectors.events_visible_to(user, after=cursor, workspaces=scope)
    return [(event.id, sse_message(event_data(event))) for event in events[:REPLAY_BATCH]]


def _scope(workspace: UUID | None) -> frozenset[str] | None:
    """What a stream asked for one workspace carries: that workspace and its team's members (its
    page shows their statuses too). None: every workspace of the caller."""
    return None if workspace is None else selectors.workspace_and_members(workspace)


T = TypeVar("T")


async def _in_pool(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a pool thread, for ``astream``'s queries. No request cycle looks
    after that thread: it leaves no connection behind."""

    def run() -> T:
        try:
            return function(*args)
        finally:
            connection.close()

    return await sync_to_async(run, thread_sensitive=False)()


def open_frame() -> bytes:
    # Tell EventSource how soon to reconnect when the stream ends.
    return f"retry: {int(settings.EVENTS_STREAM_RETRY_MS)}\n: stream open\n\n".encode()


# --- The per-user cap ------------------------------------------------------------------------
# One sorted set per user: member = stream id, score = when its lease ends (Redis server time, in
# ms). A live stream renews its lease every EVENTS_STREAM_LEASE_SECONDS / 3 and removes itself
# when it ends; the lease of a stream whose process died runs out, and the next acquire drops it.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(first[2]) - now
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return -1
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return renewed
"""


class TooManyStreams(Exception):
    def __init__(self, retry_after: int, kind: str = "event", cap: int | None = None) -> None:
        cap = settings.EVENTS_STREAMS_PER_USER if cap is None else cap
        super().__init__(f"too many open {kind} streams: at most {cap} per user.")
        self.retry_after = retry_after


# Each kind of stream has its own places (a user's log streams do not take their event streams').
_KINDS = {"event": "streams", "log": "logstreams"}


def _slots_key(user_id: int, kind: str = "event") -> str:
    return f"{settings.EVENTS_CHANNEL_PREFIX}:{_KINDS[kind]}:{user_id}"


@dataclass
class StreamSlot:
    """One open stream's place in its user's quota."""

    key: str
    member: str = field(default_factory=lambda: uuid.uuid4().hex)
    renewed_at: float = field(default_factory=time.monotonic)

    @property
    def lease_ms(self) -> str:
        return str(int(settings.EVENTS_STREAM_LEASE_SECONDS * 1000))

    def seconds_to_renewal(self) -> float:
        interval = settings.EVENTS_STREAM_LEASE_SECONDS / 3
        return max(0.0, self.renewed_at + interval - time.monotonic())

    def renew_due(self) -> bool:
        return self.seconds_to_renewal() <= 0

    def renew(self) -> bool:
        """Extend the lease; False when it had already run out (the stream should end)."""
        self.renewed_at = time.monotonic()
        return bool(get_redis().eval(_RENEW, 1, self.key, self.lease_ms, self.member))

    def release(self) -> None:
        try:
            get_redis().zrem(self.key, self.member)
        except RedisError as exc:
            logger.warning("could not release an event stream slot: %s", exc)

    async def arenew(self, client: aioredis.Redis) -> bool:
        self.renewed_at = time.monotonic()
        renewed = await client.eval(_RENEW, 1, self.key, self.lease_ms, self.member)  # type: ignore[misc]
        return bool(renewed)

    async def arelease(self, client: aioredis.Redis) -> None:
        try:
            await client.zrem(self.key, self.member)
        except RedisError as exc:
            logger.warning("could not release an event stream slot: %s", exc)


def acquire_slot(
    user: AbstractBaseUser | AnonymousUser, *, kind: str = "event", cap: int | None = None
) -> StreamSlot:
    """A place among the user's open streams of this ``kind`` (``event``: at most
    ``EVENTS_STREAMS_PER_USER``; ``log``: ``cap``), or ``TooManyStreams`` with the seconds after
    which the oldest one's lease is due (it frees then unless that stream is still alive)."""
    slot = StreamSlot(_slots_key(int(user.pk or 0), kind))
    limit = settings.EVENTS_STREAMS_PER_USER if cap is None else cap
    answer: Any = get_redis().eval(_ACQUIRE, 1, slot.key, str(limit), slot.lease_ms, slot.member)
    wait_ms = int(answer)
    if wait_ms >= 0:
        raise TooManyStreams(max(1, math.ceil(wait_ms / 1000)), kind, limit)
    return slot


def open_streams(user_id: int, kind: str = "event") -> int:
    """How many streams of this user hold a live lease (for tests and operators)."""
    key = _slots_key(user_id, kind)
    client = get_redis()
    now: Any = client.time()
    count: Any = client.zcount(key, now[0] * 1000 + now[1] // 1000, "+inf")
    return int(count)


# --- Serving ---------------------------------------------------------------------------------
def _subscribe_args(user: AbstractBaseUser | AnonymousUser) -> tuple[bool, str]:
    if getattr(user, "is_staff", False):
        return True, _all_owners_pattern()
    return False, owner_channel(int(user.pk or 0))


def stream(
    user: AbstractBaseUser | AnonymousUser,
    *,
    after: int | None,
    workspace: UUID | None = None,
    slot: StreamSlot | None = None,
    max_seconds: float | None = None,
    keepalive_seconds: float | None = None,
) -> Iterator[bytes]:
    """Yield SSE frames: the caller's events (``workspace``'s only, when given) with an id
    above ``after`` from the database, then live ones, with a keepalive comment when idle, until
    ``max_seconds`` have passed (the client reconnects with Last-Event-ID). The WSGI way: runs
    in, and holds, the request's thread."""
    max_seconds = float(max_seconds or settings.EVENTS_STREAM_MAX_SECONDS)
    keepalive_seconds = float(keepalive_seconds or settings.EVENTS_STREAM_KEEPALIVE_SECONDS)
    deadline = time.monotonic() + max_seconds
    pubsub = get_redis().pubsub(ignore_subscribe_messages=True)
    try:
        pattern, channel = _subscribe_args(user)
        if pattern:
            pubsub.psubscribe(channel)
        else:
            pubsub.subscribe(channel)
        yield open_frame()

        replayed: set[int] = set()
        scope = _scope(workspace)
        if after is not None:
            cursor = after
            while True:
                batch = _frames_after(user, cursor, scope)
                for event_id, frame in batch:
                    replayed.add(event_id)
                    yield frame
                if len(batch) < REPLAY_BATCH:
                    break
                cursor = batch[-1][0]

        # A stream lasts minutes: it must not pin a PostgreSQL connection while it waits on Redis.
        if not connection.in_atomic_block:
            connection.close()

        last_sent = time.monotonic()
        while time.monotonic() < deadline:
            if slot is not None and slot.renew_due() and not slot.renew():
                break  # our lease ran out (a long pause): reconnecting goes through the cap again
            message = pubsub.get_message(timeout=_POLL_SECONDS)
            if message is not None and message.get("type") in ("message", "pmessage"):
                data = json.loads(message["data"])
                if data["id"] in replayed:
                    continue  # committed during the replay: already sent from the database
                if scope is not None and data["workspace_id"] not in scope:
                    continue
                yield sse_message(data)
                last_sent = time.monotonic()
            elif time.monotonic() - last_sent >= keepalive_seconds:
                # A comment line: keeps proxies from closing an idle connection, and lets the
                # server notice a client that went away (the write fails).
                yield b": keepalive\n\n"
                last_sent = time.monotonic()
    except RedisError as exc:
        logger.warning("event stream ended: %s", exc)
    finally:
        pubsub.close()
        if slot is not None:
            slot.release()


async def astream(
    user: AbstractBaseUser | AnonymousUser,
    *,
    after: int | None,
    workspace: UUID | None = None,
    slot: StreamSlot | None = None,
    max_seconds: float | None = None,
    keepalive_seconds: float | None = None,
) -> AsyncIterator[bytes]:
    """``stream`` for the ASGI server: the same frames, but waiting on Redis is a coroutine, so
    an open stream holds no thread. Only the replay (on resume) borrows a pool thread for its
    queries. A client that leaves cancels it (Django's ASGI handler), which releases the slot."""
    max_seconds = float(max_seconds or settings.EVENTS_STREAM_MAX_SECONDS)
    keepalive_seconds = float(keepalive_seconds or settings.EVENTS_STREAM_KEEPALIVE_SECONDS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    client = aioredis.Redis.from_url(
        settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=None
    )
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pattern, channel = _subscribe_args(user)
        if pattern:
            await pubsub.psubscribe(channel)
        else:
            await pubsub.subscribe(channel)
        yield open_frame()

        replayed: set[int] = set()
        scope = None if workspace is None else await _in_pool(_scope, workspace)
        if after is not None:
            cursor = after
            while True:
                batch = await _in_pool(_frames_after, user, cursor, scope)
                for event_id, frame in batch:
                    replayed.add(event_id)
                    yield frame
                if len(batch) < REPLAY_BATCH:
                    break
                cursor = batch[-1][0]

        last_sent = loop.time()
        while loop.time() < deadline:
            if slot is not None and slot.renew_due() and not await slot.arenew(client):
                break
            # Sleep until a message arrives or the next thing is due (keepalive, renewal, the
            # end), not on a fixed tick: hundreds of idle streams then wake a few times a minute
            # instead of every second, and the event loop stays free for requests.
            now = loop.time()
            due = min(deadline, last_sent + keepalive_seconds)
            if slot is not None:
                due = min(due, now + slot.seconds_to_renewal())
            message = await pubsub.get_message(timeout=max(0.05, due - now))
            if message is not None and message.get("type") in ("message", "pmessage"):
                data = json.loads(message["data"])
                if data["id"] in replayed:
                    continue
                if scope is not None and data["workspace_id"] not in scope:
                    continue
                yield sse_message(data)
                last_sent = loop.time()
            elif loop.time() - last_sent >= keepalive_seconds:
                yield b": keepalive\n\n"
                last_sent = loop.time()
    except RedisError as exc:
        logger.warning("event stream ended: %s", exc)
    finally:
        # Shielded: a client that left cancels this task, and the slot must still be given back.
        await asyncio.shield(_aclose(client, pubsub, slot))


async def _aclose(
    client: aioredis.Redis, pubsub: aioredis.client.PubSub, slot: StreamSlot | None
) -> None:
    try:
        if slot is not None:
            await slot.arelease(client)
        await pubsub.aclose()
    finally:
        await client.aclose()
