"""Every backend call of a cycle sits between two lease confirmations (``lifecycle._confirmed``).

A fake backend (the real contract, ``tests.fakes``) loses the gate *during* one of its calls:
a newer holder takes the lock, as happens when this holder was paused past its lease. The
holder must then make no further backend call and write nothing: the row, its events and its
agent tokens stay exactly as they were at the moment the gate was lost.

The newer holder here takes the lock but has not begun its cycle yet, so the generation has not
moved and PostgreSQL's fencing alone would let the stale holder's writes through: these tests
fail when a confirmation is removed from the lifecycle.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from django.utils import timezone

from provisioning import gate, lifecycle, sweeper
from provisioning.backends.base import BackendError
from tests.fakes import FakeBackend, fake_backend
from workspaces import services
from workspaces.models import AgentToken, Workspace, WorkspaceEvent
from workspaces.redis_client import get_redis
from workspaces.status import EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db
S = WorkspaceStatus


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    with fake_backend() as backend:
        yield backend


def _create(user: Any, template: str = "hermes-default") -> Workspace:
    return services.create_workspace(
        owner=user, name=f"w-{uuid.uuid4().hex[:8]}", template=template, backend="fake"
    )


def _snapshot(workspace_id: UUID) -> dict[str, Any]:
    """Everything a cycle could write about the workspace."""
    return {
        "row": Workspace.objects.filter(id=workspace_id).values().get(),
        "events": list(
            WorkspaceEvent.objects.filter(workspace_id=workspace_id)
            .order_by("id")
            .values_list("id", "type")
        ),
        "tokens": list(
            AgentToken.objects.filter(workspace_id=workspace_id).values_list("generation", "id")
        ),
    }


class GateThief:
    """Makes the holder lose its gate inside one backend call, and remembers what the database
    held at that moment."""

    def __init__(
        self,
        fake: FakeBackend,
        workspace_id: UUID,
        method: str,
        then_raise: BackendError | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self.method = method
        self.then_raise = then_raise
        self.at_loss: dict[str, Any] | None = None
        self.calls_before: int | None = None
        self._fake = fake
        fake.during[method] = self.steal

    def steal(self) -> None:
        # A newer holder owns the lock now (our token no longer matches): what a holder paused
        # beyond GATE_LEASE_SECONDS finds when it wakes up.
        get_redis().set(gate.gate_key(self.workspace_id), "a-newer-holder", px=60_000)
        self.at_loss = _snapshot(self.workspace_id)
        self.calls_before = len(self._fake.calls_for(self.workspace_id))
        self._fake.during.pop(self.method)
        if self.then_raise is not None:
            raise self.then_raise

    def assert_nothing_after(self) -> None:
        assert self.at_loss is not None, f"the cycle never called {self.method}"
        calls = self._fake.calls_for(self.workspace_id)
        assert calls[self.calls_before or 0 :] == [], "a backend call after the gate was lost"
        assert _snapshot(self.workspace_id) == self.at_loss, "a write after the gate was lost"


def _converge_loses_the_gate(workspace_id: UUID) -> None:
    with pytest.raises(gate.GateBusy):
        lifecycle.converge(workspace_id)


def _running_with_empty_volume(user: Any, fake: FakeBackend) -> Workspace:
    """A provisioned workspace whose volume was emptied and a restart is pending: its restart
    calls stop, prepare, config_state, write_config and start."""
    workspace = _create(user)
    assert lifecycle.converge(workspace.id) == ["provision"]
    fake.configs[str(workspace.id)] = {}
    services.request_restart(workspace.id)
    fake.calls.clear()
    return workspace


def test_the_restart_used_here_calls_every_method(user, fake) -> None:
    workspace = _running_with_empty_volume(user, fake)
    assert lifecycle.converge(workspace.id) == ["restart"]
    assert fake.calls_for(workspace.id) == [
        "stop",
        "prepare",
        "config_state",
        "write_config",
        "start",
    ]


@pytest.mark.parametrize("method", ["stop", "prepare", "config_state", "write_config", "start"])
def test_a_restart_that_loses_the_gate_during_a_backend_call_stops_there(
    user, fake, method
) -> None:
    workspace = _running_with_empty_volume(user, fake)
    thief = GateThief(fake, workspace.id, method)
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()


@pytest.mark.parametrize("method", ["prepare", "write_config", "start"])
def test_a_first_provision_that_loses_the_gate_stops_there(user, fake, method) -> None:
    workspace = _create(user)
    thief = GateThief(fake, workspace.id, method)
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    row = Workspace.objects.get(id=workspace.id)
    assert row.has_pending_intent  # the newer holder answers it
    assert not row.is_running


def test_losing_the_gate_while_the_backend_is_selected_calls_nothing(user, fake) -> None:
    """``backend_for`` pings the backend; a lease lost by then is found before the first call
    with a side effect."""
    workspace = _create(user)
    thief = GateThief(fake, workspace.id, "check_available")
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    assert fake.calls_for(workspace.id) == []


def test_a_failing_start_after_the_gate_was_lost_neither_stops_nor_fails(user, fake) -> None:
    """The failure path stops what runs and marks the row failed; a holder that lost the gate
    does neither (the newer holder decides)."""
    workspace = _create(user)
    fake.fail_start = BackendError("engine said no")
    thief = GateThief(fake, workspace.id, "start")
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    row = Workspace.objects.get(id=workspace.id)
    assert row.status == S.PROVISIONING
    assert not row.events.filter(type=EventType.PROVISION_FAILED).exists()


def test_the_failure_path_that_loses_the_gate_while_stopping_writes_no_failure(user, fake) -> None:
    workspace = _create(user)
    fake.fail_start = BackendError("engine said no")
    thief = GateThief(fake, workspace.id, "stop")  # the failure path's stop
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    assert fake.calls_for(workspace.id)[-2:] == ["start", "stop"]
    assert Workspace.objects.get(id=workspace.id).status == S.PROVISIONING


def test_a_stop_cycle_that_loses_the_gate_while_stopping_does_not_complete(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_stop(workspace.id)
    thief = GateThief(fake, workspace.id, "stop")
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    assert Workspace.objects.get(id=workspace.id).status == S.STOPPING


def test_a_remove_cycle_that_loses_the_gate_while_removing_does_not_complete(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_remove(workspace.id)
    thief = GateThief(fake, workspace.id, "remove")
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    assert Workspace.objects.get(id=workspace.id).status == S.REMOVING


def _failed_by_the_sweep(user: Any, fake: FakeBackend) -> Workspace:
    workspace = _create(user, template="shell-default")
    lifecycle.converge(workspace.id)
    Workspace.objects.filter(id=workspace.id).update(
        provisioning_started_at=timezone.now() - timedelta(hours=2)
    )
    report = sweeper.sweep()
    assert [item.workspace_id for item in report.flipped] == [workspace.id]
    fake.calls.clear()
    return Workspace.objects.get(id=workspace.id)


def test_a_reap_that_loses_the_gate_while_stopping_records_nothing(user, fake) -> None:
    workspace = _failed_by_the_sweep(user, fake)
    assert lifecycle.plan(workspace) == lifecycle.Action.REAP
    thief = GateThief(fake, workspace.id, "stop")
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    row = Workspace.objects.get(id=workspace.id)
    assert row.is_running and row.has_pending_intent  # the newer holder reaps


def test_a_reap_whose_lease_lapsed_before_it_began_bumps_nothing(user, fake) -> None:
    workspace = _failed_by_the_sweep(user, fake)
    with pytest.raises(services.LeaseLost):
        services.begin_reap(workspace.id, still_owner=lambda: False)
    assert Workspace.objects.get(id=workspace.id).generation == workspace.generation


def test_the_reap_cycle_confirms_its_lease_before_it_begins(user, fake, monkeypatch) -> None:
    """Through the lifecycle: a lease lost while the reap waited for the row lock means no new
    generation and no backend call."""
    workspace = _failed_by_the_sweep(user, fake)
    real_begin_reap = services.begin_reap

    def begin_reap_after_losing_the_gate(workspace_id: UUID, **kwargs: Any) -> Any:
        get_redis().set(gate.gate_key(workspace_id), "a-newer-holder", px=60_000)
        return real_begin_reap(workspace_id, **kwargs)

    monkeypatch.setattr(services, "begin_reap", begin_reap_after_losing_the_gate)
    _converge_loses_the_gate(workspace.id)
    assert Workspace.objects.get(id=workspace.id).generation == workspace.generation
    assert fake.calls_for(workspace.id) == []


# --- failure paths: the backend call fails after the gate was lost ---------------------------
def test_a_failing_stop_cycle_after_the_gate_was_lost_writes_no_failure(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_stop(workspace.id)
    thief = GateThief(fake, workspace.id, "stop", then_raise=BackendError("engine said no"))
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()


def test_a_failing_removal_after_the_gate_was_lost_records_no_error(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_remove(workspace.id)
    thief = GateThief(fake, workspace.id, "remove", then_raise=BackendError("engine said no"))
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()


def test_a_failing_reap_after_the_gate_was_lost_records_no_error(user, fake) -> None:
    workspace = _failed_by_the_sweep(user, fake)
    thief = GateThief(fake, workspace.id, "stop", then_raise=BackendError("engine said no"))
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()


def test_a_failing_stop_in_the_failure_path_asks_nothing_more_after_the_gate_was_lost(
    user, fake
) -> None:
    """The failure path's stop fails; it would ask ``status`` and write ``failed``."""
    workspace = _create(user)
    fake.fail_start = BackendError("engine said no")
    asked: list[str] = []
    fake.during["status"] = lambda: asked.append("status")
    thief = GateThief(fake, workspace.id, "stop", then_raise=BackendError("stop failed too"))
    _converge_loses_the_gate(workspace.id)
    thief.assert_nothing_after()
    assert asked == []
