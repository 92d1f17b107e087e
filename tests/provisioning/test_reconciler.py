"""The reconciler against the fake backend: what disagrees, what is repaired, what is left alone.

The process-backend runs (an agent killed behind the platform's back, orphan instances) are in
test_reconcile_e2e.py.
"""

from __future__ import annotations

import logging
import uuid
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from provisioning import gate
from provisioning.backends.base import InstanceInfo, InstanceStatus, State
from provisioning.reconciler import Drift, Row, assess, reconcile_once
from tests.fakes import FakeBackend, fake_backend
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
pytestmark = pytest.mark.django_db


class ExitingFakeBackend(FakeBackend):
    """The fake backend, plus instances that exited with a code the backend knows."""

    def __init__(self) -> None:
        super().__init__()
        self.exited: dict[str, int] = {}

    def status(self, workspace_id: uuid.UUID, state: State) -> InstanceStatus:
        code = self.exited.get(str(workspace_id))
        if code is not None:
            return InstanceStatus(exists=True, running=False, exit_code=code, detail="exited")
        return super().status(workspace_id, state)

    def list_instances(self) -> list[InstanceInfo]:
        exited = [
            InstanceInfo(workspace_id=ws, running=False, exit_code=code)
            for ws, code in self.exited.items()
        ]
        return super().list_instances() + exited


@pytest.fixture
def fake() -> Any:
    with fake_backend() as backend:
        yield backend


def make_row(
    owner: Any,
    status: WorkspaceStatus,
    *,
    is_running: bool | None = None,
    pending: bool = False,
    generation: int = 1,
    backend: str = "fake",
    name: str | None = None,
    template: str = "shell-default",
) -> Workspace:
    running = status in (S.ONLINE, S.DEGRADED) if is_running is None else is_running
    desired = {
        S.STOPPED: DesiredState.STOPPED,
        S.STOPPING: DesiredState.STOPPED,
        S.REMOVING: DesiredState.REMOVED,
        S.REMOVED: DesiredState.REMOVED,
    }.get(status, DesiredState.RUNNING)
    return Workspace.objects.create(
        owner=owner,
        name=name or f"ws-{uuid.uuid4().hex[:8]}",
        template=template,
        runtime="shell",
        backend=backend,
        status=status,
        desired_state=desired,
        is_running=running,
        last_started_at=timezone.now() if running else None,
        last_heartbeat_at=timezone.now() if running else None,
        generation=generation,
        requested_seq=2 if pending else 1,
        handled_seq=1,
    )


def reconciler_events(workspace: Workspace) -> list[WorkspaceEvent]:
    return list(WorkspaceEvent.objects.filter(workspace=workspace, source=EventSource.RECONCILER))


def _row(status: WorkspaceStatus, is_running: bool, pending: bool = False) -> Row:
    return Row(uuid.uuid4(), "fake", status, is_running, 1, pending)


@pytest.mark.parametrize(
    ("status", "is_running", "pending", "running", "expected"),
    [
        (S.ONLINE, True, False, True, None),
        (S.ONLINE, True, False, False, Drift.GONE),
        (S.DEGRADED, True, False, False, Drift.GONE),
        (S.OFFLINE, True, False, False, Drift.GONE),
        (S.OFFLINE, False, False, False, None),
        (S.OFFLINE, False, False, True, Drift.UNSEEN),
        (S.STOPPED, False, False, False, None),
        (S.STOPPED, False, False, True, Drift.UNWANTED),
        (S.FAILED, False, False, True, Drift.UNWANTED),
        (S.FAILED, True, False, False, Drift.GONE),
        (S.FAILED, False, False, False, None),
        # A cycle has not started the instance yet: not the reconciler's business.
        (S.PROVISIONING, False, False, False, None),
        (S.PROVISIONING, False, False, True, None),
        # The cycle started it, then it died before its agent registered.
        (S.PROVISIONING, True, False, False, Drift.GONE),
        (S.PROVISIONING, True, False, True, None),
        # A pending intent: the next cycle writes the truth.
        (S.ONLINE, True, True, False, None),
        (S.STOPPED, False, True, True, None),
        # Cycles own these.
        (S.STOPPING, True, False, False, None),
        (S.REMOVING, True, False, True, None),
        (S.REMOVED, False, False, True, None),
    ],
)
def test_assess(
    status: WorkspaceStatus, is_running: bool, pending: bool, running: bool, expected: Drift | None
) -> None:
    assert assess(_row(status, is_running, pending), running) == expected


def test_one_list_call_for_many_workspaces_and_only_drift_is_touched(user, fake) -> None:
    healthy = [make_row(user, S.ONLINE) for _ in range(20)]
    stopped = [make_row(user, S.STOPPED) for _ in range(20)]
    for workspace in healthy:
        fake.running[str(workspace.id)] = workspace.generation
    died = make_row(user, S.ONLINE)  # the row says running; the backend runs nothing

    report = reconcile_once()

    assert report.backend_calls["fake.list_instances"] == 1
    # Only the one row that disagrees costs a call of its own.
    assert report.backend_calls["fake.status"] == 1
    assert report.disagreements == 1
    assert [repair.workspace_id for repair in report.repairs] == [str(died.id)]
    died.refresh_from_db()
    assert died.status == S.OFFLINE
    assert died.is_running is False
    (event,) = reconciler_events(died)
    assert event.type == EventType.OFFLINE
    assert event.payload["previous"] == S.ONLINE
    assert event.generation == died.generation
    for workspace in healthy + stopped:
        before = workspace.status
        workspace.refresh_from_db()
        assert workspace.status == before
        assert not reconciler_events(workspace)


def test_known_nonzero_exit_code_fails_the_workspace_with_restart_never(
    user, templates_dir
) -> None:
    # restart: never keeps a crash visible as a failure; on-failure (the default) restarts it,
    # see test_restart_policy.py.
    backend = ExitingFakeBackend()
    workspace = make_row(user, S.ONLINE, template="no-restart")
    backend.exited[str(workspace.id)] = 137
    report = reconcile_once(backends={"fake": backend})
    workspace.refresh_from_db()
    assert workspace.status == S.FAILED
    assert workspace.is_running is False
    assert "exit code 137" in workspace.last_error
    (event,) = reconciler_events(workspace)
    assert event.type == EventType.PROVISION_FAILED
    assert event.payload["exit_code"] == 137
    assert report.repairs[0].drift is Drift.GONE


def test_provisioning_instance_that_died_before_registering_fails(user, fake) -> None:
    waiting = make_row(user, S.PROVISIONING, is_running=True)
    not_started = make_row(user, S.PROVISIONING, is_running=False)
    reconcile_once()
    waiting.refresh_from_db()
    not_started.refresh_from_db()
    assert waiting.status == S.FAILED
    assert "before its agent registered" in waiting.last_error
    assert not_started.status == S.PROVISIONING
    assert not reconciler_events(not_started)


def test_instance_running_while_stopped_is_stopped(user, fake) -> None:
    workspace = make_row(user, S.STOPPED)
    fake.running[str(workspace.id)] = 1
    reconcile_once()
    assert str(workspace.id) not in fake.running
    assert fake.calls_for(workspace.id) == ["stop"]
    workspace.refresh_from_db()
    assert workspace.status == S.STOPPED
    assert workspace.is_running is False
    (event,) = reconciler_events(workspace)
    assert event.type == EventType.STOPPED
    assert event.payload["previous"] == S.STOPPED


def test_failed_row_stops_claiming_a_dead_instance(user, fake) -> None:
    workspace = make_row(user, S.FAILED, is_running=True)
    reconcile_once()
    workspace.refresh_from_db()
    assert workspace.status == S.FAILED
    assert workspace.is_running is False
    assert reconciler_events(workspace)[0].type == EventType.STOPPED


def test_offline_row_follows_a_running_instance(user, fake) -> None:
    workspace = make_row(user, S.OFFLINE, is_running=False)
    fake.running[str(workspace.id)] = 1
    reconcile_once()
    workspace.refresh_from_db()
    assert workspace.status == S.OFFLINE
    assert workspace.is_running is True
    assert fake.calls_for(workspace.id) == []  # the instance is left running


def test_pending_intent_and_in_flight_rows_are_left_alone(user, fake) -> None:
    pending = make_row(user, S.ONLINE, pending=True)
    stopping = make_row(user, S.STOPPING, is_running=True, pending=True)
    removing = make_row(user, S.REMOVING, is_running=True, pending=True)
    report = reconcile_once()
    assert report.disagreements == 0
    for workspace in (pending, stopping, removing):
        before = (workspace.status, workspace.is_running)
        workspace.refresh_from_db()
        assert (workspace.status, workspace.is_running) == before


def test_busy_gate_is_skipped_and_the_row_untouched(user, fake) -> None:
    workspace = make_row(user, S.ONLINE)
    with gate.hold(workspace.id, "a-cycle"):
        report = reconcile_once()
    assert report.skipped_busy == [str(workspace.id)]
    workspace.refresh_from_db()
    assert workspace.status == S.ONLINE
    assert not reconciler_events(workspace)
    # The next pass, with the gate free, repairs it.
    reconcile_once()
    workspace.refresh_from_db()
    assert workspace.status == S.OFFLINE


def test_confirmation_under_the_gate_wins_over_the_listing(user) -> None:
    """The listing said "not running", but by the time the gate is held a cycle has started the
    instance: the fresh status call says running and nothing is repaired."""

    class StaleListing(FakeBackend):
        def list_instances(self) -> list[InstanceInfo]:
            return []

    backend = StaleListing()
    workspace = make_row(user, S.ONLINE)
    backend.running[str(workspace.id)] = 1
    report = reconcile_once(backends={"fake": backend})
    assert report.disagreements == 1
    assert report.repairs == []
    workspace.refresh_from_db()
    assert workspace.status == S.ONLINE


def test_repairs_are_fenced_by_generation(user) -> None:
    workspace = make_row(user, S.ONLINE, generation=4)
    # A cycle moved the workspace on after the reconciler read generation 3.
    assert services.record_instance_gone(workspace.id, 3) is None
    assert not services.record_unwanted_instance_stopped(workspace.id, 3, backend_state={})
    workspace.refresh_from_db()
    assert (workspace.status, workspace.is_running) == (S.ONLINE, True)
    assert not reconciler_events(workspace)


def test_unavailable_backend_repairs_nothing(user, fake) -> None:
    workspace = make_row(user, S.ONLINE)
    fake.unavailable = "engine unreachable"
    report = reconcile_once()
    assert "fake" in report.unavailable
    workspace.refresh_from_db()
    assert workspace.status == S.ONLINE


def test_orphans_are_removed_with_a_log_line(user, fake, caplog) -> None:
    unknown = str(uuid.uuid4())
    removed = make_row(user, S.REMOVED, is_running=False)
    live = make_row(user, S.ONLINE)
    for workspace_id in (unknown, str(removed.id), str(live.id)):
        fake.running[workspace_id] = 1
    with caplog.at_level(logging.WARNING, logger="provisioning.reconciler"):
        report = reconcile_once()
    assert fake.calls_for(unknown) == ["remove"]
    assert fake.calls_for(removed.id) == ["remove"]
    assert fake.calls_for(live.id) == []
    assert {r.workspace_id for r in report.repairs if r.drift is Drift.ORPHAN} == {
        unknown,
        str(removed.id),
    }
    assert f"unknown workspace {unknown}" in caplog.text
    assert f"removed workspace {removed.id}" in caplog.text
    (event,) = reconciler_events(removed)
    assert event.type == EventType.REMOVED
    removed.refresh_from_db()
    assert removed.status == S.REMOVED  # never revived


def test_manage_py_reconcile_prints_repairs(user, fake) -> None:
    workspace = make_row(user, S.ONLINE)
    out = StringIO()
    call_command("reconcile", stdout=out)
    text = out.getvalue()
    assert f"{workspace.id} [fake] instance_gone: online -> offline" in text
    assert "1 repairs" in text


def test_a_repair_whose_lease_lapsed_leaves_the_instance_alone(user) -> None:
    """Invariant 3 for the reconciler: a holder whose lease expired while it waited on the
    backend must not stop an instance that a newer cycle may own now."""

    class LeaseLapses(FakeBackend):
        def status(self, workspace_id: uuid.UUID, state: State) -> InstanceStatus:
            # The engine answered slowly: meanwhile the lease ran out and the gate was freed.
            gate.get_redis().delete(gate.gate_key(workspace_id))
            return super().status(workspace_id, state)

    backend = LeaseLapses()
    workspace = make_row(user, S.STOPPED)
    backend.running[str(workspace.id)] = 1
    report = reconcile_once(backends={"fake": backend})
    assert report.disagreements == 1
    assert report.repairs == []
    assert report.skipped_busy == [str(workspace.id)]
    assert "stop" not in backend.calls_for(workspace.id)
    assert str(workspace.id) in backend.running
    workspace.refresh_from_db()
    assert workspace.status == S.STOPPED
    assert not reconciler_events(workspace)
