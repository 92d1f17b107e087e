"""Every recorded event, once committed, is published on its owner's Redis pub/sub channel
(``<EVENTS_CHANNEL_PREFIX>:owner:<user id>``); the live event streams (``portal.live_events``)
subscribe to these channels."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError
from rest_framework.fields import DateTimeField

from workspaces.models import WorkspaceEvent
from workspaces.redis_client import get_redis

logger = logging.getLogger(__name__)
_DATETIME = DateTimeField()  # the API's representation of a time (ISO 8601, "Z" for UTC)


def owner_channel(owner_id: int) -> str:
    return f"{settings.EVENTS_CHANNEL_PREFIX}:owner:{owner_id}"


def event_data(event: WorkspaceEvent) -> dict[str, Any]:
    """The event as the API shows it (``LiveEventSerializer``'s fields and values, which a test
    checks), plus the workspace it belongs to. Built directly: it runs for every event published
    and every event a stream replays, where a serializer costs fifty times as much."""
    return {
        "id": event.id,
        "workspace_id": str(event.workspace_id),
        "type": str(event.type),
        "source": str(event.source),
        "actor": event.actor,
        "generation": event.generation,
        "payload": event.payload,
        "created_at": _DATETIME.to_representation(event.created_at),
    }


def publish(event: WorkspaceEvent, owner_id: int) -> None:
    """Publish a committed event to its owner's channel: the row as it was written, not read
    back. Never raises: the event is in the database, and a client that missed it finds it there
    (polling or Last-Event-ID)."""
    try:
        get_redis().publish(owner_channel(owner_id), json.dumps(event_data(event)))
    except RedisError as exc:
        logger.warning("could not publish event %s: %s", event.pk, exc)
