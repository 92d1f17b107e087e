"""A holder paused past its lease, in a real worker process, touches nothing when it resumes.

The worker runs the scripted fake backend (``tests.fakes.ScriptedBackend``, the real contract):
its pool child provisions a workspace and stops itself with SIGSTOP right after ``prepare``
returned and the lease was confirmed, before the next backend call (``write_config``). The
lease (3 s here) runs out while it is stopped; a newer cycle takes the gate and runs to its end;
then the test resumes the child (SIGCONT). Its next confirmation finds the gate lost: no backend
call, no database write. The confirmation made right after ``prepare`` was fresh when the pause
began, so this fails when a pause can pass for a fresh confirmation (a window
``FRESH_CONFIRMATION_SECONDS`` as long as the lease or longer).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from django.db import transaction

from provisioning import gate, lifecycle
from tests.fakes import script, scripted_state
from tests.support import Worker, lifecycle_queue, service_env, wait_for
from workspaces import services
from workspaces.models import AgentToken, Workspace, WorkspaceEvent

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
QUEUE = "lifecycle-paused-holder"
LEASE = 3  # GATE_LEASE_SECONDS' minimum


@pytest.fixture(scope="module")
def paused_worker(
    django_db_setup: Any, django_db_blocker: Any, live_server: Any
) -> Iterator[Worker]:
    with django_db_blocker.unblock():
        env = service_env(
            live_server.url,
            CELERY_LIFECYCLE_QUEUE=QUEUE,
            GATE_LEASE_SECONDS=str(LEASE),
            GATE_BUSY_RETRY_SECONDS="1",
        )
    # One pool child: the one that pauses is the only one that runs this workspace's tasks.
    worker = Worker(env, concurrency=1, name="paused", queues=QUEUE).start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def _on_paused_worker(paused_worker: Worker) -> Iterator[None]:
    with lifecycle_queue(QUEUE):
        yield


def _snapshot(workspace_id: UUID) -> dict[str, Any]:
    """What a cycle could write about the workspace: its row, events and agent tokens."""
    return {
        "row": Workspace.objects.filter(id=workspace_id).values().get(),
        "events": list(
            WorkspaceEvent.objects.filter(workspace_id=workspace_id)
            .order_by("id")
            .values_list("id", "type", "generation")
        ),
        "tokens": list(
            AgentToken.objects.filter(workspace_id=workspace_id).values_list("generation", "id")
        ),
    }


def _calls(workspace_id: UUID) -> dict[str, str]:
    return {k: v for k, v in scripted_state(workspace_id).items() if k.startswith("calls:")}


def _process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def _converges_done(worker: Worker) -> int:
    return sum(
        1
        for line in worker.log().splitlines()
        if "provisioning.converge[" in line and "succeeded in" in line
    )


def test_a_holder_paused_past_its_lease_touches_nothing_when_it_resumes(
    user: Any, paused_worker: Worker
) -> None:
    with transaction.atomic():
        workspace = services.create_workspace(
            owner=user,
            name=f"p-{uuid.uuid4().hex[:8]}",
            template="shell-default",
            backend="scripted",
        )
        script(workspace.id, **{"pause:config": 1})

    # The pool child stops itself between prepare and write_config, holding the gate.
    pid = int(
        wait_for(
            lambda: scripted_state(workspace.id).get("paused_pid"),
            timeout=60,
            message="the cycle to pause after prepare",
        )
    )
    assert pid in paused_worker.child_pids()
    wait_for(lambda: _process_state(pid) == "T", timeout=10, message="the child stopped")
    resumed = False
    try:
        assert _calls(workspace.id) == {"calls:prepare": "1"}
        paused = Workspace.objects.get(id=workspace.id)
        assert paused.generation == 1
        done_before = _converges_done(paused_worker)

        # Nobody renews the stopped holder's lease: the gate frees itself within the lease.
        wait_for(lambda: not gate.is_held(workspace.id), timeout=LEASE + 5, message="gate free")
        # A newer cycle takes the gate and runs to its end (stop, prepare, write_config, start).
        assert lifecycle.converge(workspace.id, holder="newer") == ["restart"]
        newer = Workspace.objects.get(id=workspace.id)
        assert newer.generation == 2 and newer.is_running
        assert newer.handled_seq == newer.requested_seq
        calls, at_resume = _calls(workspace.id), _snapshot(workspace.id)
        assert calls["calls:start"] == "1" and calls["calls:prepare"] == "2"

        os.kill(pid, signal.SIGCONT)
        resumed = True
        # The resumed holder's task ends (its cycle abandoned, the gate lost) ...
        wait_for(
            lambda: _converges_done(paused_worker) > done_before,
            timeout=30,
            message="the resumed holder's task to end",
        )
        log = paused_worker.log()
        assert any(
            "cycle provision for" in line and str(workspace.id) in line and "abandoned" in line
            for line in log.splitlines()
        ), log[-3000:]
        # ... having made no backend call and written nothing: fenced at its next confirmation.
        assert _calls(workspace.id) == calls
        assert _snapshot(workspace.id) == at_resume
        assert paused_worker.proc is not None and paused_worker.proc.poll() is None
    finally:
        if not resumed:
            os.kill(pid, signal.SIGCONT)
