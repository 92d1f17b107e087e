"""The idle auto-stop sweep in-process: the deadline accessor, the compare-and-set against every
race between scan and stop, the stop through the ordinary stop cycle, and the index its scan
uses. The end-to-end tests with a real worker and beat are in tests/test_policies_e2e.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from provisioning import idle, lifecycle
from tests.fakes import fake_backend
from workspaces import services
from workspaces.manifests import invalidate_templates
from workspaces.models import AgentToken, Workspace, WorkspaceEvent
from workspaces.redis_client import get_redis
from workspaces.services.activity import _activity_key
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus
from workspaces.timeouts import idle_timeout_seconds

pytestmark = pytest.mark.django_db
S = WorkspaceStatus
IDLE_MANIFEST = "runtime: shell\nruntime_config:\n  idle_timeout_seconds: 600\n"
NEVER_MANIFEST = "runtime: shell\nruntime_config:\n  idle_timeout_seconds: 0\n"


@pytest.fixture
def idle_templates(templates_dir: Path, settings: Any) -> Path:
    for name, text in {"idles": IDLE_MANIFEST, "never-idle": NEVER_MANIFEST}.items():
        (templates_dir / name).mkdir()
        (templates_dir / name / "config.yaml").write_text(text)
    settings.IDLE_TIMEOUT_SECONDS = 0
    settings.ACTIVITY_WRITE_INTERVAL_SECONDS = 30
    invalidate_templates()
    return templates_dir


def _online(user: Any, template: str = "idles", *, idle_for: timedelta, **fields: Any) -> Workspace:
    now = timezone.now()
    return Workspace.objects.create(
        owner=user,
        name=fields.pop("name", f"ws-{uuid.uuid4().hex[:8]}"),
        template=template,
        runtime="shell",
        backend="fake",
        status=fields.pop("status", S.ONLINE),
        desired_state=DesiredState.RUNNING,
        is_running=fields.pop("is_running", True),
        last_started_at=now - idle_for,
        generation=1,
        requested_seq=fields.pop("requested_seq", 1),
        handled_seq=1,
        last_activity_at=now - idle_for,
        **fields,
    )


def test_the_timeout_comes_from_the_manifest_then_the_setting(idle_templates, settings) -> None:
    assert idle_timeout_seconds("idles", "shell") == 600
    assert idle_timeout_seconds("never-idle", "shell") == 0  # the manifest turns it off
    assert idle_timeout_seconds("shell-default", "shell") == 0  # absent: the setting, 0
    settings.IDLE_TIMEOUT_SECONDS = 900
    assert idle_timeout_seconds("shell-default", "shell") == 900
    assert idle_timeout_seconds("never-idle", "shell") == 0
    assert idle_timeout_seconds("idles", "shell") == 600
    # A short timeout counts as at least one activity write interval (see provisioning.idle).
    settings.ACTIVITY_WRITE_INTERVAL_SECONDS = 700
    assert idle.effective_timeout(600) == 700
    assert idle.effective_timeout(0) == 0


def test_an_idle_workspace_is_stopped_through_the_stop_cycle_with_an_event_naming_the_policy(
    idle_templates, user, api
) -> None:
    row = _online(user, idle_for=timedelta(minutes=11))
    spared = _online(user, idle_for=timedelta(minutes=9))
    never = _online(user, "never-idle", idle_for=timedelta(days=3))
    body = api.get(f"/api/workspaces/{row.id}/").json()
    assert body["idle_stop_at"] is not None
    assert api.get(f"/api/workspaces/{never.id}/").json()["idle_stop_at"] is None
    with fake_backend() as fake:
        fake.running[str(row.id)] = 1
        report = idle.sweep_idle()
        assert report.stopped == [row.id]
        # The 9-minute row is newer than the cutoff (the shortest timeout) and is not read;
        # `never` is read (it is older) but its template has no timeout.
        assert report.scanned == 2
        row.refresh_from_db()
        # The ordinary stop request: intent recorded, `stopping` at once, a cycle to follow.
        assert (row.status, row.desired_state, row.has_pending_intent) == (
            S.STOPPING,
            DesiredState.STOPPED,
            True,
        )
        assert lifecycle.converge(row.id) == ["stop"]
        assert str(row.id) not in fake.running
    row.refresh_from_db()
    assert row.status == S.STOPPED and not row.is_running and row.stop_reason == {}
    [stopped] = WorkspaceEvent.objects.filter(workspace=row, type=EventType.STOPPED)
    assert stopped.source == EventSource.IDLE_STOP
    assert stopped.payload["policy"] == "idle_timeout"
    assert stopped.payload["idle_timeout_seconds"] == 600
    assert stopped.payload["idle_seconds"] >= 660
    assert api.get(f"/api/workspaces/{row.id}/").json()["idle_stop_at"] is None
    for other in (spared, never):
        other.refresh_from_db()
        assert other.status == S.ONLINE


def test_a_person_stop_keeps_the_lifecycle_source(idle_templates, user) -> None:
    row = _online(user, idle_for=timedelta(minutes=1))
    with fake_backend():
        services.request_stop(row.id)
        lifecycle.converge(row.id)
    [stopped] = WorkspaceEvent.objects.filter(workspace=row, type=EventType.STOPPED)
    assert (stopped.source, stopped.payload) == (EventSource.LIFECYCLE, {})


def _agent_heartbeat(row: Workspace, *, active: bool) -> None:
    token = AgentToken.objects.create(
        workspace=row, generation=row.generation, token_hash=uuid.uuid4().hex
    )
    services.record_heartbeat(token, row.id, active=active)


RACES = {
    "proxy activity": lambda row: services.record_activity(row.id, "proxy"),
    "agent activity": lambda row: _agent_heartbeat(row, active=True),
    "restart": lambda row: services.request_restart(row.id),
    "start of a new cycle": lambda row: services.begin_cycle(row.id, S.PROVISIONING, action="x"),
    "a person's stop": lambda row: services.request_stop(row.id),
    "delete": lambda row: services.request_remove(row.id),
    "env edit": lambda row: services.update_workspace(
        row.id, env={"A": "b"}, fields=frozenset({"env"})
    ),
}


@pytest.mark.parametrize("race", sorted(RACES))
def test_whatever_lands_between_scan_and_stop_wins(idle_templates, user, race) -> None:
    row = _online(user, idle_for=timedelta(hours=2))
    get_redis().delete(_activity_key(row.id))
    before = row.status

    def between(items: Sequence[idle.Idle]) -> None:
        assert [item.row.id for item in items] == [row.id]
        RACES[race](row)

    report = idle.sweep_idle(between_scan_and_stop=between)
    assert report.stopped == [] and report.left_alone == [row.id]
    row.refresh_from_db()
    assert row.stop_reason == {}
    assert not WorkspaceEvent.objects.filter(source=EventSource.IDLE_STOP).exists()
    if race in ("proxy activity", "agent activity", "env edit"):
        assert row.status == before and row.desired_state == DesiredState.RUNNING


def test_a_silent_heartbeat_is_not_activity(idle_templates, user) -> None:
    row = _online(user, idle_for=timedelta(hours=2))
    seen = row.last_activity_at
    report = idle.sweep_idle(between_scan_and_stop=lambda _: _agent_heartbeat(row, active=False))
    assert report.stopped == [row.id]
    row.refresh_from_db()
    assert row.last_heartbeat_at is not None and row.last_heartbeat_at > seen


def test_record_activity_writes_at_most_once_per_interval(idle_templates, user) -> None:
    row = _online(user, idle_for=timedelta(hours=2))
    get_redis().delete(_activity_key(row.id))
    assert services.record_activity(row.id, "proxy") is True
    first = Workspace.objects.get(id=row.id).last_activity_at
    assert first > row.last_activity_at
    assert [services.record_activity(row.id, "proxy") for _ in range(20)] == [False] * 20
    assert Workspace.objects.get(id=row.id).last_activity_at == first
    # Without the Redis key the database's own condition still refuses a write within the
    # interval, and an unknown or removed workspace is never an error.
    get_redis().delete(_activity_key(row.id))
    assert services.record_activity(row.id, "proxy") is False
    assert services.record_activity(uuid.uuid4(), "proxy") is False
    assert services.record_activity("not-a-workspace-id", "proxy") is False


def test_statuses_that_are_not_running_and_pending_requests_are_not_idle_stopped(
    idle_templates, user
) -> None:
    old = timedelta(hours=5)
    rows = [
        _online(user, idle_for=old, status=S.STOPPED, is_running=False),
        _online(user, idle_for=old, status=S.PROVISIONING),
        _online(user, idle_for=old, status=S.FAILED, is_running=False),
        _online(user, idle_for=old, requested_seq=2),  # a request is pending
    ]
    offline = _online(user, idle_for=old, status=S.OFFLINE)
    assert idle.sweep_idle().stopped == [offline.id]
    for row in rows:
        before = row.status
        row.refresh_from_db()
        assert row.status == before


def test_a_broken_manifest_is_skipped_not_guessed(idle_templates, user, settings) -> None:
    settings.IDLE_TIMEOUT_SECONDS = 60
    row = _online(user, idle_for=timedelta(hours=2))
    (idle_templates / "idles" / "config.yaml").write_text("runtime: [not, valid]\n")
    invalidate_templates()
    report = idle.sweep_idle()
    assert report.stopped == [] and [item[0] for item in report.skipped] == [row.id]


def test_nothing_is_read_when_no_template_has_an_idle_timeout(
    templates_dir, user, settings, django_assert_num_queries
) -> None:
    settings.IDLE_TIMEOUT_SECONDS = 0
    invalidate_templates()
    _online(user, "shell-default", idle_for=timedelta(days=30))
    with django_assert_num_queries(0):
        assert idle.sweep_idle().scanned == 0


def test_keyset_batches_see_every_idle_row_once(idle_templates, user) -> None:
    rows = [_online(user, idle_for=timedelta(hours=1, seconds=i)) for i in range(7)]
    report = idle.sweep_idle(batch_size=2)
    assert sorted(report.stopped) == sorted(row.id for row in rows)


@pytest.mark.parametrize("keyset", [False, True])
def test_the_scan_is_served_by_the_partial_index(keyset: bool) -> None:
    now = timezone.now()
    after = (now - timedelta(hours=2), uuid.uuid4()) if keyset else None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = idle.idle_candidates_query(now, after)[:500].explain()
    assert "ws_idle_candidates" in plan, plan


def test_manage_py_shows_last_activity_and_idle_stop_at(idle_templates, user, capsys) -> None:
    row = _online(user, idle_for=timedelta(minutes=1), name="shown")
    call_command("workspace", "status", str(row.id), "--json")
    shown = json.loads(capsys.readouterr().out)
    deadline = row.last_activity_at + timedelta(seconds=600)
    assert datetime.fromisoformat(shown["last_activity_at"]) == row.last_activity_at
    assert datetime.fromisoformat(shown["idle_stop_at"]) == deadline
    call_command("workspace", "list")
    listed = [line for line in capsys.readouterr().out.splitlines() if "/shown " in line]
    assert len(listed) == 1 and f"{deadline:%Y-%m-%d %H:%M:%S}" in listed[0], listed
    call_command("sweep_idle")
    assert "stopped 0" in capsys.readouterr().out
