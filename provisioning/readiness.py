"""What ``/readyz`` asks beyond PostgreSQL and Redis: does a worker answer, does beat tick?

* **Workers**: a Celery broadcast (``active_queues``, a ping that also says what each worker
  consumes), at most once per ``READYZ_CACHE_SECONDS``; the answer (positive or not) is kept in
  Redis, so every web process and every probe share one broadcast. Ready needs a worker on the
  lifecycle queue and one on the sweeps queue.
* **Beat**: the beat process records the time of each task it sends (``record_beat_tick``,
  hooked to ``before_task_publish`` in beat only, see ``provisioning/worker.py``). Beat is late
  when nothing was sent for ``READYZ_BEAT_GRACE_FACTOR`` times its shortest interval (plus the
  cache time).
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

from celery import current_app
from django.conf import settings

from workspaces.redis_client import get_redis

WORKERS_KEY = "readyz:workers"
BEAT_TICK_KEY = "readyz:beat-tick"


def record_beat_tick(now: float | None = None) -> None:
    get_redis().set(BEAT_TICK_KEY, str(now if now is not None else time.time()))


def beat_interval_seconds() -> int:
    """Beat's shortest schedule interval: it sends something at least this often."""
    return min(
        settings.SWEEP_PROVISIONING_INTERVAL_SECONDS,
        settings.REDRIVE_INTERVAL_SECONDS,
        settings.RECONCILE_INTERVAL_SECONDS,
        settings.LIVENESS_SWEEP_INTERVAL_SECONDS,
    )


def check_beat() -> str:
    raw = cast(bytes | None, get_redis().get(BEAT_TICK_KEY))
    if raw is None:
        return "error: beat has never sent a task"
    age = time.time() - float(raw)
    allowed = beat_interval_seconds() * settings.READYZ_BEAT_GRACE_FACTOR
    allowed += settings.READYZ_CACHE_SECONDS
    if age > allowed:
        return f"error: beat last sent a task {age:.0f} s ago (allowed {allowed} s)"
    return "ok"


def _consumed_queues() -> list[str]:
    """The queues the answering workers consume (one broadcast, like a ping)."""
    replies: dict[str, Any] = (
        current_app.control.inspect(timeout=settings.READYZ_PING_TIMEOUT_MS / 1000).active_queues()
        or {}
    )
    return sorted({queue["name"] for queues in replies.values() for queue in queues or ()})


def check_workers() -> str:
    """At least one answering worker consumes each of the platform's queues: a worker that
    answers but does not consume the lifecycle queue cannot run a cycle."""
    redis = get_redis()
    cached = cast(bytes | None, redis.get(WORKERS_KEY))
    if cached is not None:
        consumed = set(json.loads(cached))
    else:
        consumed = set(_consumed_queues())
        redis.set(WORKERS_KEY, json.dumps(sorted(consumed)), ex=settings.READYZ_CACHE_SECONDS)
    if not consumed:
        return "error: no Celery worker answered a ping"
    wanted = [settings.CELERY_TASK_DEFAULT_QUEUE, settings.CELERY_SWEEP_QUEUE]
    missing = [queue for queue in wanted if queue not in consumed]
    if missing:
        return f"error: no Celery worker that answered consumes {', '.join(missing)}"
    return "ok"


def forget() -> None:
    """Drop the cached answers (tests; an operator who wants a fresh ping now)."""
    get_redis().delete(WORKERS_KEY)
