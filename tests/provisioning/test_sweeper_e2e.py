"""The sweep through real processes: Celery beat schedules it, a real worker runs it, the lifecycle
stops the stuck workspace's real process under the gate, and the row stays ``failed``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from django.db import connection
from django.utils import timezone

from provisioning.backends.process_launch import alive
from tests.support import Beat, Worker, lifecycle_queue, service_env, wait_for, write_templates
from workspaces.manifests import invalidate_templates
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus
SECRET = "e2e-secret-value-5b81d0c7"


@pytest.fixture(scope="module")
def e2e_templates(tmp_path_factory: Any) -> Path:
    return write_templates(tmp_path_factory.mktemp("sweep-e2e") / "templates")


# This module's worker and beat use queues of their own: a worker of another module (say the
# session's e2e worker, with the shipped templates) must never run this module's tasks.
LIFECYCLE_QUEUE = "lifecycle-sweep-e2e"
SWEEP_QUEUE = "sweeps-sweep-e2e"


@pytest.fixture(autouse=True)
def _use_templates(e2e_templates: Path, settings: Any) -> Iterator[None]:
    settings.WORKSPACE_TEMPLATES_DIR = e2e_templates
    settings.PROVISION_TIMEOUT_SECONDS = None
    invalidate_templates()
    with lifecycle_queue(LIFECYCLE_QUEUE):
        yield
    invalidate_templates()


@pytest.fixture(scope="module")
def sweep_env(e2e_templates: Path, django_db_setup: Any, django_db_blocker: Any, live_server: Any):
    with django_db_blocker.unblock():
        return service_env(
            live_server.url,
            WORKSPACE_TEMPLATES_DIR=str(e2e_templates),
            SWEEP_PROVISIONING_INTERVAL_SECONDS="1",
            LOG_LEVEL="DEBUG",
            CELERY_LIFECYCLE_QUEUE=LIFECYCLE_QUEUE,
            CELERY_SWEEP_QUEUE=SWEEP_QUEUE,
        )


@pytest.fixture(scope="module")
def sweep_worker(sweep_env: dict[str, str]) -> Iterator[Worker]:
    worker = Worker(
        sweep_env, concurrency=2, name="sweep-e2e", queues=f"{LIFECYCLE_QUEUE},{SWEEP_QUEUE}"
    ).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def beat(sweep_env: dict[str, str], tmp_path_factory: Any) -> Iterator[Beat]:
    """Exactly one ``celery beat``, with the project's schedule (the sweep every second here)."""
    process = Beat(sweep_env, tmp_path_factory.mktemp("beat"), max_interval=1).start()
    yield process
    process.stop()


def _sweeps_succeeded(worker: Worker) -> int:
    return sum(
        1
        for line in worker.log().splitlines()
        if "Task provisioning.sweep_provisioning[" in line and "succeeded" in line
    )


def test_beat_sweeps_a_stuck_boot_and_its_process_is_stopped_under_the_gate(
    api, sweep_worker, beat, instances
) -> None:
    response = api.post(
        "/api/workspaces/",
        {"name": "stuck", "template": "never-registers", "env": {"TOKENISH": SECRET}},
        format="json",
    )
    assert response.status_code == 201, response.content
    workspace_id = UUID(response.json()["id"])

    # The worker provisions it: the process runs but never registers.
    def started() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        assert row.status != S.FAILED, row.last_error
        return row if row.is_running and not row.has_pending_intent else None

    row = wait_for(started, timeout=60, message="the stuck workspace's process started")
    pid, start_time = row.backend_state["pid"], row.backend_state["start_time"]
    assert alive(pid, start_time)
    assert row.status == S.PROVISIONING

    # Beat keeps sweeping; the row is young, so it is spared. Then its deadline passes: the test
    # moves the cycle's start back 31 minutes in the database.
    runs = _sweeps_succeeded(sweep_worker)
    wait_for(lambda: _sweeps_succeeded(sweep_worker) >= runs + 2, message="two more beat sweeps")
    assert Workspace.objects.get(id=workspace_id).status == S.PROVISIONING
    Workspace.objects.filter(id=workspace_id).update(
        provisioning_started_at=timezone.now() - timedelta(minutes=31)
    )

    def reaped() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        done = row.status == S.FAILED and not row.is_running and not row.has_pending_intent
        return row if done else None

    row = wait_for(reaped, timeout=60, message="flipped by the sweep and reaped")
    wait_for(lambda: not alive(pid, start_time), timeout=10, message="the process is gone")
    assert row.status == S.FAILED  # stopping what was left did not change the verdict
    assert "600 s" in row.last_error
    failures = WorkspaceEvent.objects.filter(
        workspace_id=workspace_id, type=EventType.PROVISION_FAILED
    )
    assert [(event.source, event.payload["timeout_secs"]) for event in failures] == [
        (EventSource.PROVISION_TIMEOUT_SWEEP, 600)
    ]
    assert failures[0].payload["runtime"] == "shell"
    assert failures[0].payload["template"] == "never-registers"
    body = api.get(f"/api/workspaces/{workspace_id}/").json()
    assert body["status"] == S.FAILED and body["is_running"] is False

    log = sweep_worker.log()
    assert "stopped what failed workspace" in log
    assert SECRET not in log  # a real worker at DEBUG never logs env values


def test_preflight_through_the_worker_logs_no_env_values(api, sweep_worker) -> None:
    response = api.post(
        "/api/workspaces/",
        {"name": "pre-e2e", "template": "needs-two", "env": {"BETA_KEY": SECRET}},
        format="json",
    )
    workspace_id = UUID(response.json()["id"])
    row = wait_for(
        lambda: (r := Workspace.objects.get(id=workspace_id)).status == S.FAILED and r,
        timeout=30,
        message="preflight failure",
    )
    assert "ALPHA_KEY" in row.last_error and "BETA_KEY" not in row.last_error
    assert row.backend_state == {}
    assert SECRET not in sweep_worker.log()
    assert SECRET not in str(api.get(f"/api/workspaces/{workspace_id}/events/").content)


def test_a_poison_row_never_crash_loops_the_scheduled_sweep(sweep_worker, beat, user) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE FUNCTION test_poison_row() RETURNS trigger AS $$
            BEGIN
              IF OLD.name = 'poison' THEN RAISE EXCEPTION 'poisoned row %', OLD.id; END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER test_poison BEFORE UPDATE ON workspaces_workspace
              FOR EACH ROW EXECUTE FUNCTION test_poison_row();
            """
        )
    try:
        started = timezone.now() - timedelta(minutes=40)
        rows = {
            name: Workspace.objects.create(
                owner=user,
                name=name,
                template="shell-default",
                runtime="shell",
                backend="process",
                status=S.PROVISIONING,
                generation=1,
                requested_seq=1,
                handled_seq=1,
                provisioning_started_at=started,
            )
            for name in ("poison", "healthy-stuck")
        }
        wait_for(
            lambda: Workspace.objects.get(id=rows["healthy-stuck"].id).status == S.FAILED,
            timeout=30,
            message="the good row flipped despite the poison row",
        )
        succeeded = _sweeps_succeeded(sweep_worker)
        wait_for(
            lambda: _sweeps_succeeded(sweep_worker) >= succeeded + 3,
            timeout=30,
            message="three more scheduled sweeps succeeded",
        )
        log = sweep_worker.log()
        assert log.count(f"sweep skipped workspace {rows['poison'].id}") == 1  # pushed forward
        assert Workspace.objects.get(id=rows["poison"].id).status == S.PROVISIONING
        assert sweep_worker.proc is not None and sweep_worker.proc.poll() is None
    finally:
        with connection.cursor() as cursor:
            cursor.execute(
                "DROP TRIGGER IF EXISTS test_poison ON workspaces_workspace;"
                "DROP FUNCTION IF EXISTS test_poison_row();"
            )
