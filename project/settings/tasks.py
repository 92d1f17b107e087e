"""Celery: queues, time limits, retries, the sweeps' beat intervals, and the per-workspace gate."""

from __future__ import annotations

from project.env import (
    env_int,
    env_str,
    section,
)
from project.settings.web import REDIS_URL

section("celery")
CYCLE_TIME_LIMIT_SECONDS = env_int(
    "CYCLE_TIME_LIMIT_SECONDS",
    300,
    minimum=10,
    doc=(
        "Hard time limit of a cycle task (the soft limit is 5 s less; when it fires the"
        " cycle fails with `source=lifecycle` and stops what it started). A task "
        "message carries the limits of the process that sent it, so give web, worker "
        "and beat the same value."
    ),
)
CYCLE_SOFT_TIME_LIMIT_SECONDS = CYCLE_TIME_LIMIT_SECONDS - 5
SWEEP_TIME_LIMIT_SECONDS = env_int(
    "SWEEP_TIME_LIMIT_SECONDS",
    120,
    minimum=10,
    doc=("Hard time limit of a sweep task (the soft limit is 5 s less), and its lock's lifetime."),
)
SWEEP_SOFT_TIME_LIMIT_SECONDS = SWEEP_TIME_LIMIT_SECONDS - 5

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
# Celery keeps a result backend per thread unless it is marked thread-safe, and makes each one by
# scanning every installed package's entry points: the web process serves each request in a
# thread of its own, so every request that enqueued paid that scan. The backend here stores
# nothing, so one per process serves every thread.
CELERY_RESULT_BACKEND_THREAD_SAFE = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True
# A killed worker's task goes back to the queue (acks_late + reject_on_worker_lost) ...
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = CYCLE_TIME_LIMIT_SECONDS
CELERY_TASK_SOFT_TIME_LIMIT = CYCLE_SOFT_TIME_LIMIT_SECONDS
# ... and an unacked message is redelivered only after visibility_timeout, which must exceed the
# longest task, or a slow but healthy task would be delivered twice.
CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS = max(
    env_int(
        "CELERY_VISIBILITY_TIMEOUT_SECONDS",
        2 * CYCLE_TIME_LIMIT_SECONDS,
        minimum=60,
        doc=(
            "How long Redis keeps a task a dead worker had taken before delivering it "
            "again; never less than 60 s above either time limit."
        ),
        shown="(twice `CYCLE_TIME_LIMIT_SECONDS`)",
    ),
    CYCLE_TIME_LIMIT_SECONDS + 60,
    SWEEP_TIME_LIMIT_SECONDS + 60,
)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS,
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# On a broker connection loss, terminate the running late-ack tasks and leave their messages
# unacked (they are redelivered; the redrive sweep re-enqueues their intents from the rows): their
# gate lease lived in the same Redis and is lost anyway, and a task acking after the reconnect
# would ack on the channel of the connection that was dropped. Celery 6 makes True the default.
# (The worker's death on a Redis restart, AttributeError("'NoneType' object has no attribute
# 'hostname'"), is Celery 5.7.0's: see the pin in pyproject.toml and docs/faults.md.)
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# A request enqueues after its commit; with the broker down it must not hang the request: try a
# few times quickly, then leave the intent to the redrive sweep (the row is the outbox).
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": env_int(
        "ENQUEUE_MAX_RETRIES",
        2,
        minimum=0,
        doc=(
            "Quick publish retries after a commit before leaving the intent to the redrive sweep."
        ),
    ),
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
CELERY_WORKER_SEND_TASK_EVENTS = False
# Celery closes every database connection after each task unless this is set; then it closes them
# every 2 x this many tasks, and project.celery's task_prerun hook closes only old or broken ones.
CELERY_DB_REUSE_MAX = 500
CELERY_TASK_DEFAULT_QUEUE = env_str(
    "CELERY_LIFECYCLE_QUEUE",
    "lifecycle",
    doc="The queue of lifecycle cycles (Celery's default queue).",
)
CELERY_SWEEP_QUEUE = env_str(
    "CELERY_SWEEP_QUEUE",
    "sweeps",
    doc=(
        "The queue of the sweeps (stuck provisioning, liveness, idle, redrive) and the "
        "reconciliation passes."
    ),
)

section("timeouts")
# Beat intervals (seconds). Exactly one beat process must run; sweeps are also safe to overlap.
SWEEP_PROVISIONING_INTERVAL_SECONDS = env_int(
    "SWEEP_PROVISIONING_INTERVAL_SECONDS",
    30,
    minimum=1,
    doc="How often beat runs the stuck-provisioning sweep.",
)

section("celery")
REDRIVE_INTERVAL_SECONDS = env_int(
    "REDRIVE_INTERVAL_SECONDS",
    30,
    minimum=1,
    doc=(
        "How often beat re-enqueues workspaces whose request waited that long with no "
        "gate held (after a whole worker node died)."
    ),
)

CONVERGE_MAX_RETRIES = env_int(
    "CONVERGE_MAX_RETRIES",
    5,
    minimum=0,
    doc=(
        "Retries of a cycle task after a transient backend error (engine unreachable, "
        "timeout, 5xx); the attempt after the last retry fails the workspace "
        "(`WORKSPACE_PROVISION_FAILED`, `source=backend`, `payload.transient` true, the"
        ' engine\'s message and "still failing on the final attempt").'
    ),
)
CONVERGE_RETRY_BACKOFF_SECONDS = env_int(
    "CONVERGE_RETRY_BACKOFF_SECONDS",
    2,
    minimum=1,
    doc="First retry delay; it doubles per retry (jittered, at most 60 s).",
)

section("gate")
GATE_LEASE_SECONDS = env_int(
    "GATE_LEASE_SECONDS",
    30,
    minimum=3,
    doc=(
        "Lease of a held gate; renewed every third of it while the cycle runs. A holder"
        " that dies frees the gate within this time."
    ),
)
GATE_KEY_PREFIX = env_str(
    "GATE_KEY_PREFIX",
    "wsgate",
    doc=("Redis key prefix of the gates (`<prefix>:<workspace id>`) and their bookkeeping."),
)
GATE_BUSY_RETRY_SECONDS = env_int(
    "GATE_BUSY_RETRY_SECONDS",
    2,
    minimum=1,
    doc=(
        "When a task finds the gate busy, one retry per workspace comes back after this"
        " long (it never blocks a worker)."
    ),
)
