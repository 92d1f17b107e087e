"""Drift behind the platform's back, on the process backend, with real agents and a real worker:
a killed agent, orphan instances, a paused agent (liveness), an agent that reports itself
unhealthy, and reconcile passes racing real cycles."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from provisioning.backends.base import InstanceInfo, LaunchSpec
from provisioning.backends.process import ProcessBackend
from provisioning.backends.process_launch import alive
from provisioning.liveness import sweep_missed_heartbeats
from provisioning.reconciler import Drift, reconcile_once
from tests.support import next_backend_uid, settled, wait_for
from workspaces.manifests import templates
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("use_session_templates"),
]


def _create_online(api: Any, name: str, template: str = "shell-default") -> Workspace:
    response = api.post("/api/workspaces/", {"name": name, "template": template}, format="json")
    assert response.status_code == 201, response.content
    workspace_id = response.json()["id"]

    def online() -> Workspace | None:
        workspace = Workspace.objects.get(id=workspace_id)
        assert workspace.status != S.FAILED, workspace.last_error
        # Online is not enough: until the cycle lets go of the gate and every request is
        # handled, a reconcile pass skips the row as busy (see tests.support.settled).
        return settled(workspace_id, S.ONLINE)

    workspace = wait_for(online, timeout=30, message=f"{name} online")
    return workspace


def _process(workspace: Workspace) -> tuple[int, int]:
    return workspace.backend_state["pid"], workspace.backend_state["start_time"]


def _events(workspace: Workspace, source: EventSource) -> list[WorkspaceEvent]:
    return list(WorkspaceEvent.objects.filter(workspace=workspace, source=source))


def test_agent_killed_behind_the_platforms_back(api, celery_worker, instances) -> None:
    workspace = _create_online(api, "killed")
    pid, start_time = _process(workspace)

    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid, start_time), timeout=10, message="agent dead")
    # Nothing told the platform: the row still says running.
    workspace.refresh_from_db()
    assert (workspace.status, workspace.is_running) == (S.ONLINE, True)

    report = reconcile_once()

    workspace.refresh_from_db()
    assert workspace.is_running is False
    assert workspace.status in (S.OFFLINE, S.FAILED)
    (event,) = _events(workspace, EventSource.RECONCILER)
    assert event.type in (EventType.OFFLINE, EventType.PROVISION_FAILED)
    assert event.payload["previous"] == S.ONLINE
    assert [(r.workspace_id, r.drift) for r in report.repairs] == [(str(workspace.id), Drift.GONE)]
    assert report.backend_calls["process.list_instances"] == 1

    # A second pass finds nothing left to repair.
    assert reconcile_once().repairs == []


def _start_instance(workspace_id: uuid.UUID) -> tuple[int, int]:
    """An instance the platform did not start through a cycle: it sleeps in its boot delay."""
    template = templates().get("shell-default")
    assert template is not None
    env = {
        "WORKSPACE_ID": str(workspace_id),
        "WORKSPACE_TOKEN": "not-a-token",
        "PLATFORM_URL": settings.PLATFORM_URL,
        "AGENT_BOOT_DELAY_SECONDS": "600",
    }
    state = ProcessBackend().start(
        LaunchSpec(workspace_id, 1, template, env, uid=next_backend_uid()), {}
    )
    return state["pid"], state["start_time"]


def test_orphan_instances_are_removed_in_one_pass(user, platform_url, instances) -> None:
    removed = Workspace.objects.create(
        owner=user,
        name="gone",
        template="shell-default",
        runtime="shell",
        backend="process",
        status=S.REMOVED,
        desired_state=DesiredState.REMOVED,
        generation=3,
    )
    kept = Workspace.objects.create(
        owner=user,
        name="kept",
        template="shell-default",
        runtime="shell",
        backend="process",
        status=S.ONLINE,
        is_running=True,
        last_started_at=timezone.now(),
        last_heartbeat_at=timezone.now(),
        generation=1,
    )
    unknown_id = uuid.uuid4()
    orphans = {wid: _start_instance(wid) for wid in (unknown_id, removed.id)}
    kept_process = _start_instance(kept.id)

    report = reconcile_once()

    data = Path(settings.WORKSPACE_DATA_DIR)
    for workspace_id, (pid, start_time) in orphans.items():
        assert not alive(pid, start_time)
        assert not (data / str(workspace_id)).exists()
    assert {r.workspace_id for r in report.repairs} == {str(unknown_id), str(removed.id)}
    assert all(r.drift is Drift.ORPHAN for r in report.repairs)
    # The live workspace's instance agrees with its row and is left alone.
    assert alive(*kept_process)
    removed.refresh_from_db()
    assert removed.status == S.REMOVED
    assert [e.type for e in _events(removed, EventSource.RECONCILER)] == [EventType.REMOVED]


def test_paused_agent_goes_offline_and_comes_back(api, celery_worker, instances) -> None:
    workspace = _create_online(api, "paused", "shell-fastbeat")
    pid, start_time = _process(workspace)
    window = 2
    os.kill(pid, signal.SIGSTOP)
    try:
        # Nothing flips while heartbeats are fresh; once they are older than the window, it does.
        wait_for(
            lambda: workspace.id in sweep_missed_heartbeats(window_seconds=window),
            timeout=20,
            interval=0.2,
            message="liveness flip",
        )
        workspace.refresh_from_db()
        assert workspace.status == S.OFFLINE
        # Silent, not dead: the process still exists, so the row keeps saying it runs ...
        assert workspace.is_running is True
        (event,) = _events(workspace, EventSource.LIVENESS)
        assert event.type == EventType.OFFLINE
        assert event.payload["window_seconds"] == window
        # ... and the reconciler, which asks the backend, agrees: nothing to repair.
        assert not [r for r in reconcile_once().repairs if r.workspace_id == str(workspace.id)]
    finally:
        os.kill(pid, signal.SIGCONT)

    def back_online() -> bool:
        workspace.refresh_from_db()
        return workspace.status == S.ONLINE

    wait_for(back_online, timeout=15, message="online after SIGCONT")
    assert alive(pid, start_time)
    last = WorkspaceEvent.objects.filter(workspace=workspace).last()
    assert last is not None
    assert (last.type, last.source, last.payload.get("previous")) == (
        EventType.ONLINE,
        EventSource.AGENT,
        S.OFFLINE,
    )


def test_unhealthy_agent_makes_the_workspace_degraded(api, celery_worker, instances) -> None:
    workspace = _create_online(api, "sick", "shell-fastbeat")
    marker = Path(settings.WORKSPACE_DATA_DIR) / str(workspace.id) / "configs" / ".unhealthy"

    def status_is(expected: WorkspaceStatus) -> bool:
        workspace.refresh_from_db()
        return workspace.status == expected

    marker.touch()
    wait_for(lambda: status_is(S.DEGRADED), timeout=15, message="the workspace degraded")
    assert workspace.is_running is True
    marker.unlink()
    wait_for(lambda: status_is(S.ONLINE), timeout=15, message="online again")
    agent_events = [e.type for e in _events(workspace, EventSource.AGENT)]
    assert agent_events[-2:] == [EventType.DEGRADED, EventType.ONLINE]


class SlowListing(ProcessBackend):
    """The real process backend, with time between the listing and the pass's SELECT, so cycles
    that finish meanwhile make rows disagree with a listing that is already stale."""

    def list_instances(self) -> list[InstanceInfo]:
        found = super().list_instances()
        time.sleep(random.uniform(0, 0.3))
        return found


def test_reconcile_passes_racing_real_cycles_repair_nothing(api, celery_worker, instances) -> None:
    """Restarts run on the worker's processes while passes run back to back in this process:
    every instance is alive whenever its row claims it, so no pass may record a repair, even
    when its listing is stale by the time it reads the rows (the confirmation under the gate)."""
    workspace = _create_online(api, "busy")
    stop = threading.Event()
    passes: list[int] = []
    confirmed: list[int] = []  # suspects of a stale listing, cleared under the gate
    errors: list[BaseException] = []
    backend = SlowListing()

    def loop() -> None:
        try:
            while not stop.is_set():
                report = reconcile_once(backends={"process": backend})
                passes.append(len(report.repairs))
                confirmed.append(
                    report.disagreements - len(report.skipped_busy) - len(report.repairs)
                )
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    restarts = 0
    try:
        generation = workspace.generation
        # Restart until the race this test is about happened at least once (a pass read the
        # rows after a cycle changed them, and its confirmation under the gate cleared the
        # suspect), and at least 8 times; the bound only stops a test that cannot succeed.
        while restarts < 8 or (sum(confirmed) == 0 and restarts < 60):
            assert api.post(f"/api/workspaces/{workspace.id}/restart/").status_code == 202
            restarts += 1

            def restarted(previous: int = generation) -> Workspace | None:
                row = settled(workspace.id, S.ONLINE)
                return row if row is not None and row.generation > previous else None

            generation = wait_for(restarted, timeout=30, message="restart done").generation
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the reconcile loop did not end"
    assert not errors, errors
    print(f"{len(passes)} passes, {restarts} restarts, {sum(confirmed)} stale suspects cleared")
    assert sum(confirmed) > 0, "no pass ever read a stale listing: the race was not exercised"
    assert len(passes) > 4
    assert sum(passes) == 0
    assert not _events(workspace, EventSource.RECONCILER)
    workspace.refresh_from_db()
    assert workspace.status == S.ONLINE
    assert alive(*_process(workspace))


def test_beat_tasks_run_on_the_sweeps_queue(user, celery_worker) -> None:
    from provisioning.tasks import reconcile, sweep_liveness

    now = timezone.now()
    fields: dict[str, Any] = {
        "owner": user,
        "template": "shell-default",
        "runtime": "shell",
        "backend": "process",
        "status": S.ONLINE,
        "is_running": True,
        "last_started_at": now,
        "generation": 1,
        "requested_seq": 1,
        "handled_seq": 1,  # no request pending
    }
    # No instance behind it: the reconciler's business.
    dead = Workspace.objects.create(name="dead", last_heartbeat_at=now, **fields)
    # Silent for an hour: the liveness sweep's business (its instance state is irrelevant).
    silent = Workspace.objects.create(
        name="silent", last_heartbeat_at=now - timedelta(hours=1), **fields
    )
    sweep_liveness.delay()

    def status_of(workspace: Workspace, expected: WorkspaceStatus) -> bool:
        workspace.refresh_from_db()
        return workspace.status == expected

    wait_for(lambda: status_of(silent, S.OFFLINE), timeout=20, message="liveness task ran")
    assert [e.source for e in WorkspaceEvent.objects.filter(workspace=silent)] == [
        EventSource.LIVENESS
    ]
    reconcile.delay()
    wait_for(lambda: status_of(dead, S.OFFLINE), timeout=20, message="reconcile task ran")
    assert dead.is_running is False
    assert [e.source for e in WorkspaceEvent.objects.filter(workspace=dead)] == [
        EventSource.RECONCILER
    ]
