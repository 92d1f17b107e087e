"""A Celery worker keeps its PostgreSQL connections across tasks, as the web processes keep theirs
across requests (CONN_MAX_AGE): Celery's own default closes every connection after every task, so
each task paid a new PostgreSQL backend (fork, authentication, catalog caches) on both sides.
A connection that broke meanwhile is replaced before the next task uses it (Django's
end-of-request rule, run before each task, and the health check on first use)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from provisioning.tasks import converge_workspace
from tests.support import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

QUEUE = "worker-connections"
CONCURRENCY = 2
APP_NAME = "test-worker-connections"


def _sessions() -> int:
    """Sessions PostgreSQL has opened on the test database so far."""
    with connection.cursor() as cursor:
        # Statistics are flushed at most once a second: read a fresh snapshot after that.
        time.sleep(1.2)
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s",
            [connection.settings_dict["NAME"]],
        )
        return int(cursor.fetchone()[0])


def _run(worker: Worker, count: int) -> None:
    """Converge ``count`` workspaces that do not exist (one query each) and wait until the worker
    reports every task succeeded."""
    done_before = _succeeded(worker)
    for _ in range(count):
        converge_workspace.apply_async((str(uuid.uuid4()),), queue=QUEUE)
    deadline = time.monotonic() + 60
    while _succeeded(worker) < done_before + count:
        assert time.monotonic() < deadline, f"the worker did not run {count} tasks in 60 s"
        time.sleep(0.1)


def _succeeded(worker: Worker) -> int:
    text = worker.log_path.read_text(errors="replace")
    failed = re.findall(r"provisioning\.converge\[[^\]]+\] raised", text)
    assert not failed, f"a task failed; see {worker.log_path}"
    return len(re.findall(r"provisioning\.converge\[[^\]]+\] succeeded", text))


@pytest.fixture
def worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    env = {
        **worker_env,
        "PGAPPNAME": APP_NAME,  # libpq names the worker's sessions
        # The session's processes run with 0 (none holds a connection when the test database
        # is dropped); this worker, stopped at the end of the test, with the platform's default.
        "DATABASE_CONN_MAX_AGE": "60",
    }
    started = Worker(env, concurrency=CONCURRENCY, name="connections", queues=QUEUE).start()
    yield started
    started.stop()


def test_a_worker_keeps_its_database_connections_across_tasks(worker: Worker) -> None:
    _run(worker, 2 * CONCURRENCY)  # every child has connected once
    before = _sessions()
    _run(worker, 40)
    opened = _sessions() - before
    # The session's other processes are idle meanwhile; a few sessions of slack for them.
    assert opened <= 4, f"40 tasks opened {opened} database sessions (a new one per task?)"


def test_a_broken_connection_is_replaced_before_the_next_task(worker: Worker) -> None:
    _run(worker, 2 * CONCURRENCY)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [APP_NAME],
        )
        terminated: Any = cursor.fetchall()
    assert terminated, "the worker held no connection to terminate"
    # Every task succeeds: each child finds its connection dead and opens a new one.
    _run(worker, 10)
