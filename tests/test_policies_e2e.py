"""Lifecycle policies through real processes: a real Celery worker, a real ``celery beat`` running
the idle sweep every second, real agent processes on the process backend, the live API server.

* idle stop happens (and is shown in the API before it does);
* activity postpones it: the agent's activity file, then the proxy's ``record_activity``;
* a restart that lands while the sweep is about to stop the workspace wins;
* PATCH env then restart: the new instance sees the new value, the old one is gone;
* deleting a team's parent removes every member, each through its own cycle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg2
import pytest
import yaml
from django.conf import settings as django_settings
from django.db import connection, transaction

from provisioning.backends.process_launch import alive
from tests.support import (
    Beat,
    Worker,
    api_events,
    lifecycle_queue,
    service_env,
    wait_for,
    write_templates,
)
from workspaces import services
from workspaces.manifests import invalidate_templates
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus
IDLE_SECONDS = 6
LIFECYCLE_QUEUE = "lifecycle-policies-e2e"
SWEEP_QUEUE = "sweeps-policies-e2e"
# Writes its environment to env.json in its config folder, then becomes the platform's agent.
DUMP_ENV = (
    "import json, os, sys; "
    "path = os.path.join(os.environ['WORKSPACE_CONFIG_DIR'], 'env.json'); "
    "json.dump(dict(os.environ), open(path + '.tmp', 'w')); os.replace(path + '.tmp', path); "
    "os.execv(sys.executable, [sys.executable, sys.argv[1]])"
)
MANIFESTS = {
    "idle-short": {
        "runtime": "shell",
        "env": {"AGENT_HEARTBEAT_SECONDS": "1"},
        "runtime_config": {"idle_timeout_seconds": IDLE_SECONDS},
    },
    "env-dump": {
        "runtime": "shell",
        "command": ["{python}", "-c", DUMP_ENV, "{agent}"],
        "env": {"AGENT_HEARTBEAT_SECONDS": "1"},
        "runtime_config": {"required_env": ["GREETING"]},
    },
    "tiny-team": {"runtime": "shell", "members": ["shell-default", "shell-default"]},
}


@pytest.fixture(scope="module")
def policy_templates(tmp_path_factory: Any) -> Path:
    extra = {name: yaml.safe_dump(manifest) for name, manifest in MANIFESTS.items()}
    return write_templates(tmp_path_factory.mktemp("policies") / "templates", extra)


@pytest.fixture(autouse=True)
def _use_templates(policy_templates: Path, settings: Any) -> Iterator[None]:
    settings.WORKSPACE_TEMPLATES_DIR = policy_templates
    settings.ACTIVITY_WRITE_INTERVAL_SECONDS = 1
    invalidate_templates()
    with lifecycle_queue(LIFECYCLE_QUEUE):
        yield
    invalidate_templates()


@pytest.fixture(scope="module")
def policy_env(policy_templates: Path, django_db_setup: Any, django_db_blocker: Any, live_server):
    with django_db_blocker.unblock():
        return service_env(
            live_server.url,
            WORKSPACE_TEMPLATES_DIR=str(policy_templates),
            IDLE_SWEEP_INTERVAL_SECONDS="1",
            ACTIVITY_WRITE_INTERVAL_SECONDS="1",
            LOG_LEVEL="DEBUG",
            CELERY_LIFECYCLE_QUEUE=LIFECYCLE_QUEUE,
            CELERY_SWEEP_QUEUE=SWEEP_QUEUE,
        )


@pytest.fixture(scope="module")
def policy_worker(policy_env: dict[str, str]) -> Iterator[Worker]:
    worker = Worker(
        policy_env, concurrency=3, name="policies-e2e", queues=f"{LIFECYCLE_QUEUE},{SWEEP_QUEUE}"
    ).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def beat(policy_env: dict[str, str], tmp_path_factory: Any) -> Iterator[Beat]:
    """Exactly one ``celery beat`` with the project's schedule (the idle sweep every second)."""
    process = Beat(policy_env, tmp_path_factory.mktemp("policies-beat"), max_interval=1).start()
    yield process
    process.stop()


def _idle_sweeps(worker: Worker) -> list[str]:
    return [
        line
        for line in worker.log().splitlines()
        if "Task provisioning.sweep_idle[" in line and "succeeded" in line
    ]


def _create(api: Any, name: str, template: str, env: dict[str, str] | None = None) -> UUID:
    body: dict[str, Any] = {"name": name, "template": template}
    if env is not None:
        body["env"] = env
    response = api.post("/api/workspaces/", body, format="json")
    assert response.status_code == 201, response.content
    return UUID(response.json()["id"])


def _online(workspace_id: UUID, *, after_generation: int = 0, timeout: float = 60) -> Workspace:
    def check() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        if row.generation <= after_generation:
            return None  # the cycle asked for has not begun yet
        assert row.status != S.FAILED, row.last_error
        ok = row.status == S.ONLINE
        return row if ok else None

    return wait_for(check, timeout=timeout, interval=0.1, message=f"{workspace_id} online")


def _idle_stops(workspace_id: UUID) -> list[WorkspaceEvent]:
    return list(
        WorkspaceEvent.objects.filter(
            workspace_id=workspace_id, type=EventType.STOPPED, source=EventSource.IDLE_STOP
        )
    )


def test_an_idle_workspace_is_stopped_by_beat_with_an_event_naming_the_policy(
    api, policy_worker, beat, instances
) -> None:
    workspace_id = _create(api, "idler", "idle-short")
    row = _online(workspace_id)
    pid, start_time = row.backend_state["pid"], row.backend_state["start_time"]
    shown = api.get(f"/api/workspaces/{workspace_id}/").json()
    assert shown["last_activity_at"] is not None and shown["idle_stop_at"] is not None
    assert api.get("/api/templates/").json()  # the template list answers with the policy too
    [template] = [t for t in api.get("/api/templates/").json() if t["name"] == "idle-short"]
    assert template["idle_timeout_seconds"] == IDLE_SECONDS

    def stopped() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        done = row.status == S.STOPPED and not row.has_pending_intent
        return row if done else None

    row = wait_for(stopped, timeout=90, message="the idle workspace stopped by the sweep")
    assert not row.is_running and row.desired_state == "stopped"
    wait_for(lambda: not alive(pid, start_time), timeout=10, message="its process is gone")
    [event] = _idle_stops(workspace_id)
    assert event.payload["policy"] == "idle_timeout"
    assert event.payload["idle_timeout_seconds"] == IDLE_SECONDS
    assert event.payload["idle_seconds"] >= IDLE_SECONDS
    body = api.get(f"/api/workspaces/{workspace_id}/").json()
    assert body["idle_stop_at"] is None  # the policy does not apply to a stopped workspace
    assert any(str(workspace_id) in line for line in _idle_sweeps(policy_worker))


def test_activity_postpones_the_idle_stop(api, policy_worker, beat, instances) -> None:
    workspace_id = _create(api, "busy", "idle-short")
    row = _online(workspace_id)
    marker = Path(django_settings.WORKSPACE_DATA_DIR) / str(workspace_id) / "configs" / ".activity"
    first_activity = row.last_activity_at

    def stay_busy(signal_activity: Any, seconds: float) -> None:
        """Keep signalling activity for `seconds` (several idle timeouts) while beat sweeps."""
        sweeps = len(_idle_sweeps(policy_worker))
        until = time.monotonic() + seconds
        while time.monotonic() < until or len(_idle_sweeps(policy_worker)) < sweeps + 3:
            signal_activity()
            row = Workspace.objects.get(id=workspace_id)
            assert row.status == S.ONLINE, (row.status, row.stop_reason)
            time.sleep(0.2)

    # The agent: anything in the workspace touches the activity file; heartbeats carry it.
    stay_busy(marker.touch, 2.5 * IDLE_SECONDS)
    by_agent = Workspace.objects.get(id=workspace_id).last_activity_at
    assert by_agent > first_activity + timedelta(seconds=IDLE_SECONDS)
    # The proxy's signal: one call per request, rate limited inside.
    stay_busy(lambda: services.record_activity(workspace_id, "proxy"), 2.5 * IDLE_SECONDS)
    assert _idle_stops(workspace_id) == []
    last = Workspace.objects.get(id=workspace_id).last_activity_at
    assert last > by_agent + timedelta(seconds=IDLE_SECONDS)

    # Once the activity stops, the policy stops it.
    wait_for(
        lambda: Workspace.objects.get(id=workspace_id).status == S.STOPPED,
        timeout=90,
        message="stopped once idle",
    )
    [event] = _idle_stops(workspace_id)
    assert datetime.fromisoformat(event.payload["last_activity_at"]) >= last


def _sweep_waiting() -> bool:
    """Whether an idle sweep's compare-and-set (an UPDATE to ``stopping``) waits on a row lock.
    Asked on a connection of its own: within a transaction PostgreSQL keeps showing the same
    snapshot of pg_stat_activity."""
    db = connection.settings_dict
    with (
        psycopg2.connect(
            dbname=db["NAME"],
            user=db["USER"] or "postgres",
            password=db["PASSWORD"] or None,
            host=db["HOST"] or "127.0.0.1",
            port=db["PORT"] or 5432,
        ) as probe,
        probe.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' "
            "AND query LIKE 'UPDATE \"workspaces_workspace\" SET \"status\" = ''stopping''%%'"
        )
        row = cursor.fetchone()
    probe.close()
    return bool(row and row[0])


def test_a_restart_that_lands_during_the_sweep_wins(api, policy_worker, beat, instances) -> None:
    workspace_id = _create(api, "contested", "idle-short")
    row = _online(workspace_id)
    generation = row.generation
    # Hold the row: the sweep scans it (reads are not blocked), judges it idle once the timeout
    # passes, and its compare-and-set UPDATE waits for this lock. Then the restart lands.
    with transaction.atomic():
        Workspace.objects.select_for_update().get(id=workspace_id)
        wait_for(
            _sweep_waiting,
            timeout=60,
            interval=0.2,
            message="the idle sweep blocked on the row",
        )
        response = api.post(f"/api/workspaces/{workspace_id}/restart/")
        assert response.status_code == 202, response.content
    # The sweep's UPDATE now sees a new last_activity_at and a pending request: it stops nothing.
    row = _online(workspace_id, after_generation=generation)
    cycles = WorkspaceEvent.objects.filter(
        workspace_id=workspace_id, type=EventType.PROVISIONING, generation=generation + 1
    )
    assert [event.payload["action"] for event in cycles] == ["restart"]
    assert not [e for e in _idle_stops(workspace_id) if e.generation <= generation + 1]
    wait_for(
        lambda: any(
            "left_alone" in line and f"'{workspace_id}'" in line.split("left_alone")[1]
            for line in _idle_sweeps(policy_worker)
        ),
        timeout=30,
        message="the sweep reported the workspace left alone",
    )


def _env_file(workspace_id: UUID) -> dict[str, str]:
    path = Path(django_settings.WORKSPACE_DATA_DIR) / str(workspace_id) / "configs" / "env.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def test_patch_env_then_restart_reaches_the_new_instance(api, policy_worker, instances) -> None:
    old, new = "old-greeting-7c1d5e", "new-greeting-3b9f0a"
    workspace_id = _create(api, "greeter", "env-dump")
    # Created without its required variable: preflight fails it.
    row = wait_for(
        lambda: (r := Workspace.objects.get(id=workspace_id)).status == S.FAILED and r,
        timeout=60,
        message="preflight failure",
    )
    assert "GREETING" in row.last_error
    # Fixed by a PATCH and a restart, not a delete and a new workspace.
    # A second variable holds the old value too: the next PATCH replaces the whole map.
    response = api.patch(
        f"/api/workspaces/{workspace_id}/",
        {"env": {"GREETING": old, "FAREWELL": old}},
        format="json",
    )
    assert response.status_code == 200 and response.json()["pending_changes"] == ["env"]
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    row = _online(workspace_id, after_generation=row.generation)
    wait_for(lambda: _env_file(workspace_id).get("GREETING") == old, message="the old value")
    assert api.get(f"/api/workspaces/{workspace_id}/").json()["pending_changes"] == []
    old_instance = (row.backend_state["pid"], row.backend_state.get("start_time"))
    assert alive(*old_instance)

    response = api.patch(
        f"/api/workspaces/{workspace_id}/", {"env": {"GREETING": new}}, format="json"
    )
    assert response.status_code == 200 and response.json()["pending_changes"] == ["env"]
    assert new not in response.content.decode()
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    row = _online(workspace_id, after_generation=row.generation)
    wait_for(lambda: _env_file(workspace_id).get("GREETING") == new, message="the new value")
    assert "FAREWELL" not in _env_file(workspace_id)  # the new instance has the new map alone
    assert api.get(f"/api/workspaces/{workspace_id}/").json()["pending_changes"] == []
    # The old instance is gone: the restart stopped it before the new one started.
    assert (row.backend_state["pid"], row.backend_state.get("start_time")) != old_instance
    assert not alive(*old_instance)
    # The old value is gone from the database: the stored env opens to the new value alone, and
    # neither value is in the row as stored (encrypted) nor in any event; nor in the worker's log.
    assert row.env.reveal() == {"GREETING": new}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT row_to_json(w)::text FROM workspaces_workspace w WHERE id = %s", [workspace_id]
        )
        stored = cursor.fetchone()[0]
        assert old not in stored and new not in stored
        cursor.execute(
            "SELECT count(*) FROM workspaces_workspaceevent "
            "WHERE payload::text LIKE %s OR payload::text LIKE %s",
            [f"%{old}%", f"%{new}%"],
        )
        assert cursor.fetchone()[0] == 0
    assert old not in policy_worker.log() and new not in policy_worker.log()
    assert len(api_events(api, str(workspace_id))) > 0


def test_deleting_a_team_parent_removes_every_member(api, policy_worker, instances) -> None:
    response = api.post("/api/teams/", {"name": "duo", "template": "tiny-team"}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    ids = [UUID(body["parent"]["id"]), *(UUID(member["id"]) for member in body["members"])]
    rows = [_online(workspace_id) for workspace_id in ids]
    processes = [(row.backend_state["pid"], row.backend_state["start_time"]) for row in rows]
    parent = api.get(f"/api/workspaces/{ids[0]}/").json()
    assert sorted(member["id"] for member in parent["members"]) == sorted(map(str, ids[1:]))

    assert api.delete(f"/api/workspaces/{ids[0]}/").status_code == 202  # one request

    wait_for(
        lambda: (
            set(Workspace.objects.filter(id__in=ids).values_list("status", flat=True))
            == {S.REMOVED}
        ),
        timeout=90,
        message="the parent and every member removed",
    )
    for pid, start_time in processes:
        wait_for(lambda: not alive(pid, start_time), timeout=10, message="process gone")  # noqa: B023
    for workspace_id, row in zip(ids, rows, strict=True):
        # Each through its own remove cycle: its own generation bump and its own event.
        after = Workspace.objects.get(id=workspace_id)
        assert after.generation == row.generation + 1
        [removed] = WorkspaceEvent.objects.filter(workspace_id=workspace_id, type=EventType.REMOVED)
        assert removed.source == EventSource.LIFECYCLE
        assert removed.generation == after.generation
    parent = api.get(f"/api/workspaces/{ids[0]}/").json()
    assert {member["status"] for member in parent["members"]} == {S.REMOVED}
