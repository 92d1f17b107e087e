"""The engine's hooks in the Celery processes: beat's record of its ticks for ``/readyz``, and
what a worker's main process loads before it forks."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from redis.exceptions import RedisError

from provisioning.backends import preload_modules
from provisioning.readiness import record_beat_tick

logger = logging.getLogger(__name__)


# Readiness: the beat process records each task it sends, so /readyz can tell a beat that stopped
# ticking (provisioning/readiness.py). Only beat connects the hook.
@signals.beat_init.connect
def _beat_records_ticks(sender: Any = None, **_: Any) -> None:
    signals.before_task_publish.connect(_beat_tick, weak=False)


def _beat_tick(sender: Any = None, **_: Any) -> None:
    try:
        record_beat_tick()
    except RedisError as exc:  # a Redis hiccup must never stop beat from sending its sweeps
        logger.warning("could not record beat's tick for /readyz: %s", exc)


# A worker's main process loads every backend's module (the engine SDK is most of a cold child's
# first cycle) before it forks its pool, so no child pays those imports in a workspace's cycle.
@signals.worker_init.connect
def _preload_backends(**_: Any) -> None:
    preload_modules()
