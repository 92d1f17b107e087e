"""The liveness sweep and the heartbeat path: compare-and-set flips, and the way back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from provisioning.liveness import sweep_missed_heartbeats
from tests.provisioning.test_reconciler import make_row
from workspaces import services
from workspaces.models import AgentToken, WorkspaceEvent
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
pytestmark = pytest.mark.django_db
WINDOW = 30


def _silent(workspace, seconds: float = WINDOW + 5) -> None:
    type(workspace).objects.filter(id=workspace.id).update(
        last_heartbeat_at=timezone.now() - timedelta(seconds=seconds)
    )
    workspace.refresh_from_db()


def _token(workspace) -> AgentToken:
    raw = services.issue_agent_token(workspace.id, workspace.generation)
    token = services.authenticate_agent(raw)
    assert token is not None
    return token


def test_sweep_flips_only_silent_online_and_degraded(user) -> None:
    silent_online = make_row(user, S.ONLINE)
    silent_degraded = make_row(user, S.DEGRADED)
    fresh = make_row(user, S.ONLINE)
    stopped = make_row(user, S.STOPPED)
    provisioning = make_row(user, S.PROVISIONING, is_running=True)
    for workspace in (silent_online, silent_degraded, stopped, provisioning):
        _silent(workspace)

    flipped = sweep_missed_heartbeats(window_seconds=WINDOW)

    assert set(flipped) == {silent_online.id, silent_degraded.id}
    for workspace, previous in ((silent_online, S.ONLINE), (silent_degraded, S.DEGRADED)):
        workspace.refresh_from_db()
        assert workspace.status == S.OFFLINE
        # Silence says nothing about the instance: the row keeps what the backend last said.
        assert workspace.is_running is True
        (event,) = WorkspaceEvent.objects.filter(workspace=workspace)
        assert (event.type, event.source) == (EventType.OFFLINE, EventSource.LIVENESS)
        assert event.payload["previous"] == previous
        assert event.payload["window_seconds"] == WINDOW
    for workspace, status in (
        (fresh, S.ONLINE),
        (stopped, S.STOPPED),
        (provisioning, S.PROVISIONING),
    ):
        workspace.refresh_from_db()
        assert workspace.status == status
    assert sweep_missed_heartbeats(window_seconds=WINDOW) == []


def test_a_heartbeat_between_read_and_flip_wins(user) -> None:
    workspace = make_row(user, S.ONLINE)
    _silent(workspace)
    seen = workspace.last_heartbeat_at
    services.record_heartbeat(_token(workspace), workspace.id)  # lands after the sweep's read
    assert not services.mark_missed_heartbeats(
        workspace.id,
        workspace.generation,
        previous=S.ONLINE,
        last_heartbeat_at=seen,
        window_seconds=WINDOW,
    )
    workspace.refresh_from_db()
    assert workspace.status == S.ONLINE


def test_a_new_cycle_between_read_and_flip_wins(user) -> None:
    workspace = make_row(user, S.ONLINE, generation=2)
    _silent(workspace)
    assert not services.mark_missed_heartbeats(
        workspace.id,
        1,
        previous=S.ONLINE,
        last_heartbeat_at=workspace.last_heartbeat_at,
        window_seconds=WINDOW,
    )


def test_next_heartbeat_brings_it_back_and_unhealthy_degrades(user) -> None:
    workspace = make_row(user, S.ONLINE)
    token = _token(workspace)
    _silent(workspace)
    sweep_missed_heartbeats(window_seconds=WINDOW)
    assert services.record_heartbeat(token, workspace.id).status == S.ONLINE
    assert services.record_heartbeat(token, workspace.id, healthy=False).status == S.DEGRADED
    assert services.record_heartbeat(token, workspace.id).status == S.ONLINE
    types = list(WorkspaceEvent.objects.filter(workspace=workspace).values_list("type", flat=True))
    assert types == [EventType.OFFLINE, EventType.ONLINE, EventType.DEGRADED, EventType.ONLINE]


def test_removed_workspace_is_never_revived(user) -> None:
    workspace = make_row(user, S.ONLINE)
    token = _token(workspace)
    type(workspace).objects.filter(id=workspace.id).update(
        status=S.REMOVED, is_running=False, desired_state=DesiredState.REMOVED
    )
    with pytest.raises(services.AgentAuthError):
        services.record_heartbeat(token, workspace.id)
    assert sweep_missed_heartbeats(window_seconds=0) == []
    workspace.refresh_from_db()
    assert workspace.status == S.REMOVED


def test_heartbeat_http_for_removed_workspace_is_refused(user, client) -> None:
    workspace = make_row(user, S.ONLINE)
    raw = services.issue_agent_token(workspace.id, workspace.generation)
    type(workspace).objects.filter(id=workspace.id).update(status=S.REMOVED, is_running=False)
    response = client.post(
        "/api/registry/heartbeat",
        {"workspace_id": str(workspace.id), "healthy": True},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )
    assert response.status_code == 401
    workspace.refresh_from_db()
    assert workspace.status == S.REMOVED


def test_a_beat_that_changes_no_status_is_one_update(user) -> None:
    """The common beat (status already what it confirms) is one fenced UPDATE and no
    transaction; one that changes the status, or comes with a stale token, takes the locked path
    and is answered as before."""
    workspace = make_row(user, S.ONLINE)
    token = _token(workspace)
    before = timezone.now()
    with CaptureQueriesContext(connection) as queries:
        answer = services.record_heartbeat(token, workspace.id, active=True)
    assert (answer.id, answer.status, answer.generation) == (workspace.id, S.ONLINE, 1)
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["UPDATE"]
    workspace.refresh_from_db()
    assert workspace.last_heartbeat_at is not None and workspace.last_heartbeat_at >= before
    assert workspace.last_activity_at is not None and workspace.last_activity_at >= before
    # Unhealthy: a status change, on the locked path, with its event.
    with CaptureQueriesContext(connection) as queries:
        assert services.record_heartbeat(token, workspace.id, healthy=False).status == S.DEGRADED
    assert len(queries.captured_queries) > 1
    assert services.record_heartbeat(token, workspace.id, healthy=False).status == S.DEGRADED
    # A newer cycle: the token's generation is stale, and the beat is refused, saying so.
    type(workspace).objects.filter(id=workspace.id).update(generation=2)
    with pytest.raises(services.AgentAuthError, match="stale"):
        services.record_heartbeat(token, workspace.id)


def test_a_registration_reads_its_row_once_and_answers_what_it_wrote(user) -> None:
    """Registration locks the row (with its owner) and writes it; the event takes that row
    instead of reading name, owner and requester again, and the answer is the row as written,
    not read back."""
    workspace = make_row(user, S.PROVISIONING, is_running=True)
    token = _token(workspace)
    with CaptureQueriesContext(connection) as queries:
        answer = services.register_agent(token, workspace.id)
    selects = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert len(selects) == 1 and "FOR UPDATE" in selects[0], selects
    stored = type(workspace).objects.get(id=workspace.id)
    for name in ("status", "is_running", "generation", "last_started_at", "last_error"):
        assert getattr(answer, name) == getattr(stored, name), name
    assert stored.status == S.ONLINE
    (event,) = WorkspaceEvent.objects.filter(workspace=workspace, type=EventType.ONLINE)
    assert event.actor == "agent"
