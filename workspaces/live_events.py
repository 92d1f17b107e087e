"""Live events: every recorded event is published on Redis pub/sub once committed, and
``GET /api/events/stream`` turns the caller's share of them into Server-Sent Events.

Channels: one per owner (``<EVENTS_CHANNEL_PREFIX>:owner:<user id>``); a non-staff stream
subscribes to its owner's channel only, so it never receives another owner's events; a staff
stream subscribes to the pattern of all owners.

A stream subscribes *before* it replays from the database (events with an id above
``Last-Event-ID``), so an event committed during the replay arrives live; one that is both
replayed and heard live is sent once. Pub/sub is lossy by design (a subscriber that is not
connected hears nothing), which is why resuming always goes through the database.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from redis.exceptions import RedisError

from provisioning.redis_client import get_redis
from workspaces import selectors
from workspaces.models import WorkspaceEvent

logger = logging.getLogger(__name__)
REPLAY_BATCH = 500
# Poll granularity of the live loop: bounds how late a keepalive or the end of the stream is.
_POLL_SECONDS = 1.0


def owner_channel(owner_id: int) -> str:
    return f"{settings.EVENTS_CHANNEL_PREFIX}:owner:{owner_id}"


def _all_owners_pattern() -> str:
    return f"{settings.EVENTS_CHANNEL_PREFIX}:owner:*"


def event_data(event: WorkspaceEvent) -> dict[str, Any]:
    """The event as the API shows it, plus the workspace it belongs to."""
    from workspaces.api.serializers import LiveEventSerializer

    return dict(LiveEventSerializer(event).data)


def publish(event_id: int) -> None:
    """Publish a committed event to its owner's channel. Never raises: the event is in the
    database, and a client that missed it finds it there (polling or Last-Event-ID)."""
    try:
        event = WorkspaceEvent.objects.select_related("workspace").filter(id=event_id).first()
        if event is None:
            return
        channel = owner_channel(event.workspace.owner_id)
        get_redis().publish(channel, json.dumps(event_data(event)))
    except RedisError as exc:
        logger.warning("could not publish event %s: %s", event_id, exc)


def sse_message(data: dict[str, Any]) -> bytes:
    return f"id: {data['id']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream(
    user: AbstractBaseUser | AnonymousUser,
    *,
    after: int | None,
    max_seconds: float | None = None,
    keepalive_seconds: float | None = None,
) -> Iterator[bytes]:
    """Yield SSE frames: the caller's events with an id above ``after`` from the database, then
    live ones, with a keepalive comment when idle, until ``max_seconds`` have passed (the client
    reconnects with Last-Event-ID). Runs in the web thread that serves the request."""
    max_seconds = float(max_seconds or settings.EVENTS_STREAM_MAX_SECONDS)
    keepalive_seconds = float(keepalive_seconds or settings.EVENTS_STREAM_KEEPALIVE_SECONDS)
    deadline = time.monotonic() + max_seconds
    pubsub = get_redis().pubsub(ignore_subscribe_messages=True)
    try:
        if getattr(user, "is_staff", False):
            pubsub.psubscribe(_all_owners_pattern())
        else:
            pubsub.subscribe(owner_channel(int(user.pk or 0)))
        # Tell EventSource how soon to reconnect when the stream ends.
        yield f"retry: {int(settings.EVENTS_STREAM_RETRY_MS)}\n: stream open\n\n".encode()

        replayed: set[int] = set()
        if after is not None:
            cursor = after
            while True:
                batch = list(selectors.events_visible_to(user, after=cursor)[:REPLAY_BATCH])
                for event in batch:
                    replayed.add(event.id)
                    yield sse_message(event_data(event))
                if len(batch) < REPLAY_BATCH:
                    break
                cursor = batch[-1].id

        # A stream lasts minutes: it must not pin a PostgreSQL connection while it waits on Redis.
        if not connection.in_atomic_block:
            connection.close()

        last_sent = time.monotonic()
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=_POLL_SECONDS)
            if message is not None and message.get("type") in ("message", "pmessage"):
                data = json.loads(message["data"])
                if data["id"] in replayed:
                    continue  # committed during the replay: already sent from the database
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
