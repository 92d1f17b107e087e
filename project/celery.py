"""The Celery app: queues, beat schedule and the ``workspace_gates`` inspect command. The
engine's hooks in the worker and beat processes are in ``provisioning.worker``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals
from celery.worker.control import inspect_command
from django.conf import settings
from django.db import close_old_connections

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["provisioning"])


@app.on_after_finalize.connect
def _configure_routes_and_beat(sender: Celery, **_: Any) -> None:
    sweep_queue = settings.CELERY_SWEEP_QUEUE
    sender.conf.task_routes = {
        "provisioning.sweep_provisioning": {"queue": sweep_queue},
        "provisioning.redrive_pending": {"queue": sweep_queue},
        "provisioning.reconcile": {"queue": sweep_queue},
        "provisioning.sweep_liveness": {"queue": sweep_queue},
        "provisioning.sweep_idle": {"queue": sweep_queue},
        "provisioning.sweep_pools": {"queue": sweep_queue},
        "provisioning.refill_pool": {"queue": sweep_queue},
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
        "sweep-pools": {
            "task": "provisioning.sweep_pools",
            "schedule": float(settings.POOL_SWEEP_INTERVAL_SECONDS),
            "options": {"queue": sweep_queue, "expires": settings.POOL_SWEEP_INTERVAL_SECONDS},
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
    # Registered with the app, so that ``celery -A project inspect`` knows the command; the app
    # loads with the settings, before Django's apps, which the gate's module needs: it is
    # imported when the command runs.
    from provisioning.gate import gates_held_by

    hostname = state.consumer.hostname if state and state.consumer else ""
    return {"gates": gates_held_by(hostname)}


# Database connections outlive a task, as they outlive a request in the web processes
# (CONN_MAX_AGE, health-checked on first use): settings.CELERY_DB_REUSE_MAX keeps Celery from
# closing them after every task (a new PostgreSQL backend per task), and this applies Django's
# own end-of-request rule before each task instead: close a connection that is too old or broken.
@signals.task_prerun.connect
def _close_old_connections(**_: Any) -> None:
    close_old_connections()
