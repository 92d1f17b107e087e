"""The restart policy (manifest ``restart: on-failure | never``) against the fake backend: a death
while wanted running is an event with the exit code and the last output, a restart follows with
exponential backoff, N deaths in the window make the workspace ``failed``, and a request cancels
the pending restart. The real agents and worker are in test_faults.py."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from provisioning import lifecycle
from provisioning.backends.base import InstanceStatus, State
from provisioning.reconciler import reconcile_once
from tests.provisioning.test_reconciler import ExitingFakeBackend, make_row, reconciler_events
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import DesiredState, EventType, WorkspaceStatus

S = WorkspaceStatus
pytestmark = pytest.mark.django_db


class DyingBackend(ExitingFakeBackend):
    """Instances that exited with a known code and left some output behind."""

    def status(self, workspace_id: uuid.UUID, state: State) -> InstanceStatus:
        found = super().status(workspace_id, state)
        if str(workspace_id) in self.exited:
            return InstanceStatus(
                exists=True,
                running=False,
                exit_code=found.exit_code,
                detail=found.detail,
                output_tail="booting\nTraceback: something broke",
            )
        return found


@pytest.fixture
def policy(settings: Any) -> Any:
    settings.RESTART_BACKOFF_BASE_SECONDS = 2
    settings.RESTART_BACKOFF_MAX_SECONDS = 5
    settings.RESTART_MAX_FAILURES = 3
    settings.RESTART_FAILURE_WINDOW_SECONDS = 600
    return settings


def _die(workspace: Workspace, code: int = 137) -> Workspace:
    backend = DyingBackend()
    backend.exited[str(workspace.id)] = code
    reconcile_once(backends={"fake": backend})
    workspace.refresh_from_db()
    return workspace


def _back_online(workspace: Workspace) -> Workspace:
    """What a restart ends in once its agent registers: online, a newer generation."""
    workspace.refresh_from_db()
    Workspace.objects.filter(id=workspace.id).update(
        status=S.ONLINE,
        is_running=True,
        last_started_at=timezone.now(),
        generation=workspace.generation + 1,
        handled_seq=workspace.requested_seq,
    )
    workspace.refresh_from_db()
    return workspace


def test_backoff_doubles_from_the_base_up_to_the_cap(policy) -> None:
    assert [services.restart_backoff_seconds(n) for n in range(1, 6)] == [2, 4, 5, 5, 5]


def test_a_crash_is_an_event_with_exit_code_and_output_and_schedules_a_restart(
    user, policy, django_capture_on_commit_callbacks
) -> None:
    workspace = make_row(user, S.ONLINE)
    with django_capture_on_commit_callbacks(execute=False):
        workspace = _die(workspace)
    assert workspace.status == S.OFFLINE
    assert workspace.is_running is False
    assert workspace.restart_at is not None
    assert "killed" in workspace.last_error or "exit code 137" in workspace.last_error
    assert "something broke" in workspace.last_error
    assert "restart 1 in 2 s" in workspace.last_error
    (event,) = reconciler_events(workspace)
    assert event.type == EventType.OFFLINE
    assert event.payload["exit_code"] == 137
    assert event.payload["output"].endswith("Traceback: something broke")
    assert event.payload["restart_attempt"] == 1
    assert event.payload["restart_in_seconds"] == 2

    # Not due yet: nothing happens.
    assert services.restart_due(workspace.id) is False
    Workspace.objects.filter(id=workspace.id).update(restart_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.restart_due(workspace.id) is True
    workspace.refresh_from_db()
    assert workspace.restart_at is None
    assert workspace.has_pending_intent
    assert lifecycle.plan(workspace) == lifecycle.Action.START
    assert [cb.func for cb in callbacks if hasattr(cb, "func")] == [services.send_converge]


def test_the_nth_death_in_the_window_fails_the_workspace_with_a_clear_error(
    user, policy, django_capture_on_commit_callbacks
) -> None:
    workspace = make_row(user, S.ONLINE)
    delays = []
    for attempt in (1, 2):
        with django_capture_on_commit_callbacks(execute=False):
            workspace = _die(workspace)
        assert workspace.status == S.OFFLINE
        delays.append(reconciler_events(workspace)[-1].payload["restart_in_seconds"])
        Workspace.objects.filter(id=workspace.id).update(restart_at=timezone.now())
        with django_capture_on_commit_callbacks(execute=False):
            assert services.restart_due(workspace.id), attempt
        workspace = _back_online(workspace)
    assert delays == [2, 4]
    with django_capture_on_commit_callbacks(execute=False):
        workspace = _die(workspace, code=3)
    assert workspace.status == S.FAILED
    assert workspace.restart_at is None
    assert "gave up restarting" in workspace.last_error
    assert "exit code 3" in workspace.last_error
    assert "3th death within 600 s" in workspace.last_error
    last = reconciler_events(workspace)[-1]
    assert last.type == EventType.PROVISION_FAILED
    assert last.payload["exit_code"] == 3
    assert last.payload["restart"] == "gave_up"
    assert lifecycle.plan(workspace) is None  # nothing more is tried


def test_deaths_outside_the_window_do_not_count(
    user, policy, django_capture_on_commit_callbacks
) -> None:
    workspace = make_row(user, S.ONLINE)
    with django_capture_on_commit_callbacks(execute=False):
        workspace = _die(workspace)
    old = timezone.now() - timedelta(seconds=policy.RESTART_FAILURE_WINDOW_SECONDS + 1)
    reconciler_events(workspace)[-1].__class__.objects.filter(workspace=workspace).update(
        created_at=old
    )
    Workspace.objects.filter(id=workspace.id).update(restart_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=False):
        services.restart_due(workspace.id)
    workspace = _back_online(workspace)
    with django_capture_on_commit_callbacks(execute=False):
        workspace = _die(workspace)
    assert reconciler_events(workspace)[-1].payload["restart_attempt"] == 1


@pytest.mark.parametrize("request_service", ["request_stop", "request_remove", "request_start"])
def test_a_request_cancels_the_pending_restart(
    user, policy, request_service, django_capture_on_commit_callbacks
) -> None:
    workspace = make_row(user, S.ONLINE)
    with django_capture_on_commit_callbacks(execute=False):
        workspace = _die(workspace)
        assert workspace.restart_at is not None
        getattr(services, request_service)(workspace.id)
    workspace.refresh_from_db()
    assert workspace.restart_at is None
    seq = workspace.requested_seq
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert services.restart_due(workspace.id) is False
    workspace.refresh_from_db()
    assert workspace.requested_seq == seq
    assert not callbacks


def test_a_clean_exit_while_wanted_running_is_restarted_too(user, policy) -> None:
    # An agent stopped outside the platform (an engine restart sends SIGTERM) exits 0.
    workspace = _die(make_row(user, S.ONLINE), code=0)
    assert workspace.status == S.OFFLINE
    assert workspace.restart_at is not None
    (event,) = reconciler_events(workspace)
    assert event.payload["exit_code"] == 0
    assert event.payload["restart_attempt"] == 1


def test_restart_never_leaves_a_clean_exit_offline(user, policy, templates_dir) -> None:
    workspace = _die(make_row(user, S.ONLINE, template="no-restart"), code=0)
    assert workspace.status == S.OFFLINE
    assert workspace.restart_at is None


def test_restart_never_leaves_a_crash_failed(user, policy, templates_dir) -> None:
    workspace = _die(make_row(user, S.ONLINE, template="no-restart"))
    assert workspace.status == S.FAILED
    assert workspace.restart_at is None
    assert "its last output: Traceback: something broke" in workspace.last_error


def test_a_stopped_workspace_is_never_restarted(user, policy) -> None:
    workspace = make_row(user, S.ONLINE)
    Workspace.objects.filter(id=workspace.id).update(desired_state=DesiredState.STOPPED)
    workspace = _die(workspace)
    assert workspace.restart_at is None
    assert workspace.status == S.FAILED  # a crash it was not asked to survive: visible


def test_the_redrive_sweep_acts_on_a_due_restart_whose_timer_was_lost(
    user, policy, django_capture_on_commit_callbacks
) -> None:
    from provisioning.tasks import redrive_pending

    workspace = make_row(user, S.ONLINE)
    with django_capture_on_commit_callbacks(execute=False):
        workspace = _die(workspace)
    Workspace.objects.filter(id=workspace.id).update(restart_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=False):
        assert redrive_pending() >= 1
    workspace.refresh_from_db()
    assert workspace.restart_at is None
    assert workspace.has_pending_intent


def test_the_manifest_rejects_an_unknown_policy(tmp_path) -> None:
    from workspaces.manifests import InvalidManifest, parse_manifest

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.yaml").write_text("runtime: shell\nrestart: always\n")
    with pytest.raises(InvalidManifest, match="restart"):
        parse_manifest("bad", folder / "config.yaml")
