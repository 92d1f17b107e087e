"""The stuck-provisioning sweep against real PostgreSQL and Redis (sweeps run in-process here;
tests/provisioning/test_sweeper_e2e.py runs them through real Celery workers and beat).

Deadlines are set in the database by the tests (``provisioning_started_at``), never by sleeping.
"""

from __future__ import annotations

import io
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from provisioning import lifecycle, sweeper
from tests.fakes import fake_backend
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.redis_client import get_redis
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db
S = WorkspaceStatus
MIN = timedelta(minutes=1)


@pytest.fixture(autouse=True)
def _clean_sweep_keys(templates_dir: Any) -> Any:
    client = get_redis()
    for key in client.scan_iter("*sweep-provisioning*"):
        client.delete(key)
    yield


def sweep_failures(workspace: Workspace) -> list[WorkspaceEvent]:
    return list(
        WorkspaceEvent.objects.filter(
            workspace=workspace,
            type=EventType.PROVISION_FAILED,
            source=EventSource.PROVISION_TIMEOUT_SWEEP,
        )
    )


def reload(workspace: Workspace) -> Workspace:
    workspace.refresh_from_db()
    return workspace


# --- the incidents ---------------------------------------------------------------------------
def test_slow_runtime_is_spared_at_11_minutes_and_flipped_at_31(make_row) -> None:
    now = timezone.now()
    young = make_row("hermes-default", age=11 * MIN, now=now)
    old = make_row("hermes-default", age=31 * MIN, now=now)

    report = sweeper.sweep(now=now)

    assert [item.workspace_id for item in report.flipped] == [old.id]
    assert reload(young).status == S.PROVISIONING
    assert sweep_failures(young) == []
    assert reload(old).status == S.FAILED
    [event] = sweep_failures(old)
    assert event.payload["timeout_secs"] == 1800
    assert event.payload["runtime"] == "hermes"
    assert event.payload["template"] == "hermes-default"
    assert event.generation == old.generation


def test_manifest_of_20_minutes_spares_11_and_flips_21(make_row) -> None:
    """Also the regression test for "the sweeper stops consulting the manifest": runtime
    ``shell`` has no runtime default, so a sweeper that ignores the manifest uses 600 s and
    flips the 11-minute row."""
    now = timezone.now()
    young = make_row("slowboot", age=11 * MIN, now=now)
    old = make_row("slowboot", age=21 * MIN, now=now)

    report = sweeper.sweep(now=now)

    assert reload(young).status == S.PROVISIONING, "the manifest's 1200 s was not applied"
    assert [item.workspace_id for item in report.flipped] == [old.id]
    assert report.flipped[0].timeout_secs == 1200
    [event] = sweep_failures(old)
    assert event.payload["timeout_secs"] == 1200
    assert event.payload["runtime"] == "shell"


def test_env_override_beats_the_manifest(make_row, settings) -> None:
    settings.PROVISION_TIMEOUT_SECONDS = 300
    now = timezone.now()
    manifest_row = make_row("slowboot", age=11 * MIN, now=now)  # manifest says 1200 s
    runtime_row = make_row("hermes-default", age=11 * MIN, now=now)  # runtime default 1800 s
    fresh = make_row("slowboot", age=4 * MIN, now=now)

    sweeper.sweep(now=now)

    assert reload(fresh).status == S.PROVISIONING
    for row in (manifest_row, runtime_row):
        assert reload(row).status == S.FAILED
        [event] = sweep_failures(row)
        assert event.payload["timeout_secs"] == 300


def test_manifest_edited_on_disk_counts_at_the_next_sweep(make_row, templates_dir) -> None:
    now = timezone.now()
    row = make_row("slowboot", age=16 * MIN, now=now)
    assert sweeper.sweep(now=now).flipped == []  # 1200 s: spared

    (templates_dir / "slowboot" / "config.yaml").write_text(
        "runtime: shell\nruntime_config:\n  provision_timeout_seconds: 900\n"
    )
    from workspaces.manifests import invalidate_templates

    invalidate_templates()  # what the registry does on its own within a second
    report = sweeper.sweep(now=now)
    assert [item.workspace_id for item in report.flipped] == [row.id]
    assert report.flipped[0].timeout_secs == 900


def test_agent_registering_between_scan_and_flip_is_left_alone(make_row) -> None:
    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now)
    raw = services.issue_agent_token(row.id, row.generation)

    def agent_registers(overdue: Any) -> None:
        assert [item.row.id for item in overdue] == [row.id]  # the scan saw it overdue
        token = services.authenticate_agent(raw)
        assert token is not None
        services.register_agent(token, row.id)

    report = sweeper.sweep(now=now, between_scan_and_flip=agent_registers)

    assert report.flipped == []
    assert report.left_alone == [row.id]
    row = reload(row)
    assert row.status == S.ONLINE
    assert row.is_running and row.last_error == ""
    assert row.desired_state == DesiredState.RUNNING
    assert sweep_failures(row) == []


@pytest.mark.parametrize("race", ["new_cycle", "stop_request", "delete_request"])
def test_any_change_between_scan_and_flip_is_left_alone(make_row, race) -> None:
    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now)

    def meanwhile(overdue: Any) -> None:
        if race == "new_cycle":
            assert services.begin_cycle(row.id, S.PROVISIONING, action="restart") is not None
        elif race == "stop_request":
            services.request_stop(row.id)
        else:
            services.request_remove(row.id)

    report = sweeper.sweep(now=now, between_scan_and_flip=meanwhile)

    assert report.flipped == [] and report.left_alone == [row.id]
    assert reload(row).status != S.FAILED
    assert sweep_failures(row) == []


def test_same_generation_but_a_new_start_time_is_left_alone(make_row) -> None:
    """The deadline is part of the compare-and-set, not only status and generation."""
    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now)

    def restarted_clock(overdue: Any) -> None:
        Workspace.objects.filter(id=row.id).update(provisioning_started_at=timezone.now())

    report = sweeper.sweep(now=now, between_scan_and_flip=restarted_clock)
    assert report.left_alone == [row.id]
    assert reload(row).status == S.PROVISIONING


# --- what the flip records, and stopping what is left ---------------------------------------
def test_flip_records_one_failure_the_stop_intent_and_enqueues_a_converge(
    make_row, django_capture_on_commit_callbacks
) -> None:
    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now, is_running=True)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        sweeper.sweep(now=now)
    flipped = Workspace.objects.get(id=row.id)
    assert flipped.status == S.FAILED
    assert flipped.generation == row.generation  # only cycles bump it, under the gate
    assert flipped.desired_state == DesiredState.STOPPED
    assert flipped.requested_seq == row.requested_seq + 1  # a pending intent: redrive covers it
    assert flipped.is_running  # unknown until the backend is asked, under the gate
    assert "600 s" in flipped.last_error
    # One converge enqueued after commit (the other callbacks publish the event live).
    converges = [cb for cb in callbacks if getattr(cb, "func", None) == services.send_converge]
    assert len(converges) == 1
    failures = WorkspaceEvent.objects.filter(workspace=row, type=EventType.PROVISION_FAILED)
    assert [(event.source, event.payload["timeout_secs"]) for event in failures] == [
        (EventSource.PROVISION_TIMEOUT_SWEEP, 600)
    ]
    assert lifecycle.plan(flipped) == lifecycle.Action.REAP


def test_converge_after_the_flip_stops_the_leftover_and_keeps_failed(make_row) -> None:
    now = timezone.now()
    with fake_backend() as fake:
        row = make_row("shell-default", age=31 * MIN, now=now, backend="fake", is_running=True)
        fake.running[str(row.id)] = row.generation

        sweeper.sweep(now=now)
        assert lifecycle.converge(row.id) == ["reap"]

        assert fake.calls_for(row.id) == ["stop"]
        assert str(row.id) not in fake.running
        row = reload(row)
        assert row.status == S.FAILED
        assert not row.is_running and not row.has_pending_intent
        assert row.generation == 2  # the reap is a cycle: a stale holder can no longer write
        assert "600 s" in row.last_error
        assert lifecycle.converge(row.id) == []  # nothing more to do

        # The failure is final until a person asks: start works from here.
        services.request_start(row.id)
        assert lifecycle.converge(row.id) == ["start"]
        assert fake.calls_for(row.id)[-1] == "start"


def test_a_cycle_that_never_finished_is_reaped_not_retried(make_row) -> None:
    """A killed worker leaves its request pending; after the flip the converge that redelivery or
    the redrive brings must stop what is left, not start another cycle (no retry loop)."""
    now = timezone.now()
    with fake_backend() as fake:
        row = make_row("shell-default", age=31 * MIN, now=now, backend="fake", pending=True)
        fake.running[str(row.id)] = row.generation
        sweeper.sweep(now=now)
        assert lifecycle.converge(row.id) == ["reap"]
        assert fake.calls_for(row.id) == ["stop"]
        assert reload(row).status == S.FAILED


def test_stuck_holder_that_finishes_after_the_flip_reaps_under_its_own_gate(make_row) -> None:
    """The holder of the stuck cycle writes its facts after the flip (same generation); its loop
    re-reads the row and reaps, so nothing it started keeps running."""
    now = timezone.now()
    with fake_backend() as fake:
        row = make_row("shell-default", age=31 * MIN, now=now, backend="fake", pending=True)
        sweeper.sweep(now=now)
        # The late holder: backend.start returned, it records what it saw, fenced by generation.
        fake.running[str(row.id)] = row.generation
        services.record_backend_facts(
            row.id, row.generation, is_running=True, backend_state={}, started=True, handled_seq=1
        )
        assert reload(row).status == S.FAILED
        assert lifecycle.plan(reload(row)) == lifecycle.Action.REAP
        assert lifecycle.converge(row.id) == ["reap"]
        assert str(row.id) not in fake.running
        assert not reload(row).is_running


def test_reap_waits_for_an_unreachable_backend_and_keeps_the_intent(make_row) -> None:
    now = timezone.now()
    with fake_backend() as fake:
        row = make_row("shell-default", age=31 * MIN, now=now, backend="fake", is_running=True)
        fake.running[str(row.id)] = row.generation
        sweeper.sweep(now=now)

        fake.unavailable = "engine down"
        assert lifecycle.converge(row.id) == []
        waiting = reload(row)
        assert waiting.status == S.FAILED and waiting.is_running
        assert waiting.has_pending_intent  # the redrive sweep brings the reap back
        assert "engine down" in waiting.last_error
        assert lifecycle.converge(row.id) == []  # retried: the note is not repeated
        assert reload(row).last_error.count("engine down") == 1

        fake.unavailable = None
        assert lifecycle.converge(row.id) == ["reap"]
        done = reload(row)
        assert done.status == S.FAILED and not done.is_running and not done.has_pending_intent
        assert "engine down" not in done.last_error and "600 s" in done.last_error


def test_a_restart_after_the_flip_replaces_the_leftover(make_row) -> None:
    now = timezone.now()
    with fake_backend() as fake:
        row = make_row("shell-default", age=31 * MIN, now=now, backend="fake", is_running=True)
        fake.running[str(row.id)] = row.generation
        sweeper.sweep(now=now)
        services.request_restart(row.id)
        assert lifecycle.converge(row.id) == ["restart"]
        assert fake.calls_for(row.id)[:2] == ["stop", "prepare"]
        assert reload(row).status == S.PROVISIONING


# --- bad rows, overlap, batches ---------------------------------------------------------------
def test_malformed_manifest_row_is_skipped_and_reported_never_a_crash(
    make_row, templates_dir
) -> None:
    now = timezone.now()
    broken_dir = templates_dir / "broken"
    broken_dir.mkdir()
    (broken_dir / "config.yaml").write_text(
        "runtime: shell\nruntime_config:\n  provision_timeout_seconds: twenty\n"
    )
    from workspaces.manifests import invalidate_templates

    invalidate_templates()
    broken = make_row("broken", runtime="shell", age=31 * MIN, now=now)
    fine = make_row("shell-default", age=31 * MIN, now=now)

    report = sweeper.sweep(now=now)

    assert [item.workspace_id for item in report.flipped] == [fine.id]
    [skipped] = report.skipped
    assert skipped.workspace_id == broken.id
    assert str(broken_dir / "config.yaml") in skipped.reason
    assert "runtime_config.provision_timeout_seconds" in skipped.reason
    assert reload(broken).status == S.PROVISIONING  # never flipped on a guessed deadline


@pytest.fixture
def poison_trigger() -> Any:
    """A real PostgreSQL failure on one row: any UPDATE of a workspace named 'poison' raises."""
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
    yield  # the test's transaction rolls the trigger back


def test_poison_row_is_skipped_reported_and_pushed_forward(make_row, poison_trigger) -> None:
    now = timezone.now()
    poison = make_row("shell-default", name="poison", age=40 * MIN, now=now)  # oldest: first
    others = [make_row("shell-default", age=31 * MIN, now=now) for _ in range(3)]

    first = sweeper.sweep(now=now)

    assert {item.workspace_id for item in first.flipped} == {row.id for row in others}
    [skipped] = first.skipped
    assert skipped.workspace_id == poison.id and "poisoned row" in skipped.reason
    assert reload(poison).status == S.PROVISIONING
    assert WorkspaceEvent.objects.filter(workspace=poison).count() == 0  # rolled back whole

    second = sweeper.sweep(now=now)
    assert second.deferred == [poison.id]  # pushed forward: not retried every sweep
    assert second.skipped == [] and second.flipped == []
    key = sweeper._poison_key(poison.id)
    ttl = int(get_redis().ttl(key))  # type: ignore[arg-type]
    assert 0 < ttl <= 300


def test_overlapping_sweeps_are_skipped_by_the_lock_and_harmless_without_it(make_row) -> None:
    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now)
    lock = get_redis().lock(sweeper._lock_key(), timeout=60)
    assert lock.acquire(blocking=False)
    try:
        assert sweeper.sweep(now=now).overlapped
        assert reload(row).status == S.PROVISIONING
        first = sweeper.sweep(now=now, use_lock=False)
        second = sweeper.sweep(now=now, use_lock=False)
    finally:
        lock.release()
    assert [item.workspace_id for item in first.flipped] == [row.id]
    assert second.flipped == [] and second.scanned == 0
    assert len(sweep_failures(row)) == 1


def test_keyset_batches_visit_every_row_once_even_with_equal_start_times(make_row) -> None:
    now = timezone.now()
    rows = [make_row("shell-default", age=31 * MIN, now=now) for _ in range(7)]
    rows += [make_row("shell-default", age=(40 + i) * MIN, now=now) for i in range(3)]
    spared = make_row("hermes-default", age=29 * MIN, now=now)

    report = sweeper.sweep(now=now, batch_size=3)

    assert report.scanned == 11
    assert sorted(str(item.workspace_id) for item in report.flipped) == sorted(
        str(row.id) for row in rows
    )
    assert reload(spared).status == S.PROVISIONING
    assert all(len(sweep_failures(row)) == 1 for row in rows)


def test_only_provisioning_rows_are_scanned(make_row) -> None:
    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now)
    for status in (S.STOPPING, S.FAILED):
        other = make_row("shell-default", age=31 * MIN, now=now)
        Workspace.objects.filter(id=other.id).update(status=status)
    report = sweeper.sweep(now=now)
    assert report.scanned == 1 and [item.workspace_id for item in report.flipped] == [row.id]


def test_manage_py_sweep_prints_what_it_flipped(make_row) -> None:
    now = timezone.now()
    old = make_row("hermes-default", name="slow-one", age=31 * MIN, now=now)
    make_row("hermes-default", age=11 * MIN, now=now)
    out = io.StringIO()
    call_command("sweep_provisioning", stdout=out)
    text = out.getvalue()
    assert f"flipped {old.id} (slow-one) template=hermes-default runtime=hermes" in text
    assert "timeout_secs=1800" in text
    assert "scanned 2 in flight, flipped 1" in text


def test_a_time_limit_stops_the_sweep_without_blaming_a_row(make_row, monkeypatch) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    now = timezone.now()
    row = make_row("shell-default", age=31 * MIN, now=now)

    def out_of_time(*args: Any, **kwargs: Any) -> bool:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(services, "fail_stuck_provisioning", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        sweeper.sweep(now=now)
    assert get_redis().get(sweeper._poison_key(row.id)) is None  # not pushed forward
    monkeypatch.undo()
    assert [item.workspace_id for item in sweeper.sweep(now=now).flipped] == [row.id]


@pytest.mark.parametrize("keyset", [False, True])
def test_the_scan_is_served_by_the_partial_index_of_rows_in_flight(keyset: bool) -> None:
    """Invariant 6: the sweep's cost follows the rows in flight, not the table. With sequential
    scans ruled out, PostgreSQL must still find an index for the scan's exact query, and the one
    it uses must be the partial index on in-flight rows."""
    now = timezone.now()
    after = (now - timedelta(minutes=5), uuid.uuid4()) if keyset else None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = sweeper.in_flight_query(now, after)[:500].explain()
    assert "ws_provisioning_inflight" in plan, plan
