"""Transient backend errors and the soft time limit, through a real Celery worker.

The worker runs a scripted fake backend (``tests.fakes.ScriptedBackend``, registered in the
worker by ``EXTRA_BACKEND_FACTORIES`` in tests/settings.py): the test scripts, per workspace, how
many times a backend method raises ``TransientBackendError`` or how long it sleeps, and reads
back how often each method was called, across the worker's children.

The worker allows 3 retries, 1 s apart at first (``CONVERGE_MAX_RETRIES``,
``CONVERGE_RETRY_BACKOFF_SECONDS``), and a 10 s cycle (soft limit 5 s), so a failed test does
not wait minutes; the mechanism is the one production runs.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from tests.fakes import script, scripted_calls
from tests.support import Worker, lifecycle_queue, service_env, wait_settled
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus
QUEUE = "lifecycle-retries"
MAX_RETRIES = 3
SOFT_LIMIT = 5  # CYCLE_TIME_LIMIT_SECONDS - 5


@pytest.fixture(scope="module")
def retry_worker(
    django_db_setup: Any, django_db_blocker: Any, live_server: Any
) -> Iterator[Worker]:
    with django_db_blocker.unblock():
        env = service_env(
            live_server.url,
            CELERY_LIFECYCLE_QUEUE=QUEUE,
            CONVERGE_MAX_RETRIES=str(MAX_RETRIES),
            CONVERGE_RETRY_BACKOFF_SECONDS="1",
            CYCLE_TIME_LIMIT_SECONDS=str(SOFT_LIMIT + 5),
        )
    worker = Worker(env, concurrency=2, name="retries", queues=QUEUE).start()
    yield worker
    worker.stop()
    # Keep the log where a person can read it after the data folder is cleaned up.
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-retries-worker.log")


@pytest.fixture(autouse=True)
def _on_retry_worker(retry_worker: Worker) -> Iterator[None]:
    with lifecycle_queue(QUEUE):
        yield


def _create_scripted(user: Any, **steps: int) -> Workspace:
    """A workspace on the scripted backend; its script is in place before its first converge
    (enqueued when the transaction commits)."""
    with transaction.atomic():
        workspace = services.create_workspace(
            owner=user,
            name=f"r-{uuid.uuid4().hex[:8]}",
            template="shell-default",
            backend="scripted",
        )
        script(workspace.id, **steps)
    return workspace


def test_transient_errors_within_the_limit_end_in_a_started_instance(user, retry_worker) -> None:
    failures = MAX_RETRIES - 1
    workspace = _create_scripted(user, **{"transient:prepare": failures})
    row = wait_settled(workspace.id, S.PROVISIONING, timeout=90)
    assert row.is_running and row.last_started_at is not None
    assert scripted_calls(workspace.id, "prepare") == failures + 1
    assert scripted_calls(workspace.id, "start") == 1
    assert not row.events.filter(type=EventType.PROVISION_FAILED).exists()
    # Every attempt is a cycle of its own: a new generation each time.
    assert row.generation == failures + 1
    assert row.events.filter(type=EventType.PROVISIONING).count() == failures + 1


def test_transient_errors_past_the_limit_fail_the_workspace_saying_why(user, retry_worker) -> None:
    attempts = MAX_RETRIES + 1
    workspace = _create_scripted(user, **{"transient:prepare": attempts + 10})
    row = wait_settled(workspace.id, S.FAILED, timeout=90)
    assert scripted_calls(workspace.id, "prepare") == attempts  # the first try and 3 retries
    assert scripted_calls(workspace.id, "start") == 0
    assert not row.is_running
    failure = row.events.get(type=EventType.PROVISION_FAILED)
    assert failure.source == EventSource.BACKEND
    assert failure.payload["transient"] is True
    assert f"scripted transient failure {attempts} of prepare" in failure.payload["message"]
    assert "still failing on the final attempt" in failure.payload["message"]
    assert row.last_error == failure.payload["message"]


def test_the_soft_time_limit_fires_in_a_real_worker_and_fails_the_cycle(user, retry_worker) -> None:
    # The request enqueues the cycle by the task's name, with no time limits of its own: the
    # worker applies its own (SOFT_LIMIT here).
    workspace = _create_scripted(user, **{"sleep:start": 60})
    row = wait_settled(workspace.id, S.FAILED, timeout=60)
    failure = row.events.get(type=EventType.PROVISION_FAILED)
    assert failure.source == EventSource.LIFECYCLE
    assert f"the provision cycle exceeded {SOFT_LIMIT} s" in failure.payload["message"]
    assert scripted_calls(workspace.id, "start") == 1
    # The failure path stopped what the interrupted start may have left.
    assert scripted_calls(workspace.id, "stop") == 1
    assert not row.is_running
    assert f"Soft time limit ({SOFT_LIMIT}s) exceeded" in retry_worker.log()
