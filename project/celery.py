"""The Celery app: queues, beat schedule and the ``workspace_gates`` inspect command."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals
from celery.worker.control import inspect_command

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

logger = logging.getLogger(__name__)

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["provisioning"])


@app.on_after_finalize.connect
def _configure_routes_and_beat(sender: Celery, **_: Any) -> None:
    from django.conf import settings

    sweep_queue = settings.CELERY_SWEEP_QUEUE
    sender.conf.task_routes = {
        "provisioning.sweep_provisioning": {"queue": sweep_queue},
        "provisioning.redrive_pending": {"queue": sweep_queue},
        "provisioning.reconcile": {"queue": sweep_queue},
        "provisioning.sweep_liveness": {"queue": sweep_queue},
        "provisioning.sweep_idle": {"queue": sweep_queue},
    }
    sender.conf.beat_schedule = {
        "sweep-stuck-provisioning": {
            "task": "provisioning.sweep_provisioning",
            "schedule": float(settings.SWEEP_PROVISIONING_INTERVAL_SECONDS),
            "options": {
                "queue": sweep_queue,
                "expires": settings.SWEEP_PROVISIONING_INTERVAL_SECONDS,
            },
        },
        "redrive-pending-intents": {
            "task": "provisioning.redrive_pending",
            "schedule": float(settings.REDRIVE_INTERVAL_SECONDS),
            "options": {"queue": sweep_queue, "expires": settings.REDRIVE_INTERVAL_SECONDS},
        },
        "reconcile": {
            "task": "provisioning.reconcile",
            "schedule": float(settings.RECONCILE_INTERVAL_SECONDS),
            "options": {"queue": sweep_queue, "expires": settings.RECONCILE_INTERVAL_SECONDS},
        },
        "sweep-liveness": {
            "task": "provisioning.sweep_liveness",
            "schedule": float(settings.LIVENESS_SWEEP_INTERVAL_SECONDS),
            "options": {
                "queue": sweep_queue,
                "expires": settings.LIVENESS_SWEEP_INTERVAL_SECONDS,
            },
        },
        "sweep-idle": {
            "task": "provisioning.sweep_idle",
            "schedule": float(settings.IDLE_SWEEP_INTERVAL_SECONDS),
            "options": {"queue": sweep_queue, "expires": settings.IDLE_SWEEP_INTERVAL_SECONDS},
        },
    }


@inspect_command()
def workspace_gates(state: Any) -> dict[str, Any]:
    """List the workspace gates held by this worker node: workspace id, generation, seconds held.

    Gates are held by the pool's child processes, so each holder records itself in Redis under
    the node's hostname; this command runs in the node's main process and reads that record.
    """
    from provisioning.gate import gates_held_by

    hostname = state.consumer.hostname if state and state.consumer else ""
    return {"gates": gates_held_by(hostname)}


# Readiness: the beat process records each task it sends, so /readyz can tell a beat that stopped
# ticking (provisioning/readiness.py). Only beat connects the hook.
@signals.beat_init.connect
def _beat_records_ticks(sender: Any = None, **_: Any) -> None:
    signals.before_task_publish.connect(_beat_tick, weak=False)


def _beat_tick(sender: Any = None, **_: Any) -> None:
    from redis.exceptions import RedisError

    from provisioning.readiness import record_beat_tick

    try:
        record_beat_tick()
    except RedisError as exc:  # a Redis hiccup must never stop beat from sending its sweeps
        logger.warning("could not record beat's tick for /readyz: %s", exc)


# A worker's main process loads every backend's module (the engine SDK is most of a cold child's
# first cycle) and the live events module before it forks its pool, so no child pays those
# imports in a workspace's cycle.
@signals.worker_init.connect
def _preload_backends(**_: Any) -> None:
    from project import warmup
    from provisioning.backends import preload_modules

    preload_modules()
    warmup.events()


# Database connections outlive a task, as they outlive a request in the web processes
# (CONN_MAX_AGE, health-checked on first use): settings.CELERY_DB_REUSE_MAX keeps Celery from
# closing them after every task (a new PostgreSQL backend per task), and this applies Django's
# own end-of-request rule before each task instead: close a connection that is too old or broken.
@signals.task_prerun.connect
def _close_old_connections(**_: Any) -> None:
    from django.db import close_old_connections

    close_old_connections()
