"""The hottest reads and writes of a workspace's life: the locked read, the status UPDATE
(``transition``), the event INSERT, the token reads, the app ports in use and a cycle's fenced
UPDATE. Each loads whole instances (values, types, the owner at hand) in one statement, writes
what it is given, and refuses what it must (fencing, the row lock, the transition table)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg2
import pytest
from django.db import connection, transaction
from django.db.models import F, Q
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from workspaces import selectors, services
from workspaces.crypto import SealedEnv
from workspaces.manifests import templates
from workspaces.models import AgentToken, ApiToken, Workspace, WorkspaceEvent
from workspaces.services import requests
from workspaces.services.common import LeaseLost, _locked, record_event, transition
from workspaces.services.cycles import record_backend_facts
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
# The rows' clocks: equal on every row a test compares.
STARTED = timezone.now() - timedelta(minutes=3)


def _values(instance: Any) -> dict[str, Any]:
    """Every concrete field's value and type, as loaded on the instance."""
    found = {}
    for field in type(instance)._meta.concrete_fields:
        value = getattr(instance, field.attname)
        if isinstance(value, SealedEnv):
            value = value.token
        found[field.attname] = (value, type(value))
    return found


def _running(user: Any, name: str) -> Workspace:
    created = services.create_workspace(
        owner=user, name=name, template="shell-default", env={"TOKEN": "s3cret"}
    )
    Workspace.objects.filter(id=created.id).update(
        status=S.ONLINE,
        is_running=True,
        last_started_at=STARTED,
        last_heartbeat_at=STARTED,
        last_activity_at=STARTED,
        provisioning_started_at=STARTED,
        status_changed_at=STARTED,
        generation=4,
        backend_state={"pid": 12, "nested": {"a": [1, 2]}},
        stop_reason={"kind": "idle"},
    )
    return created


@pytest.mark.django_db
def test_the_locked_read_loads_the_whole_row_and_its_owner(user: Any) -> None:
    created = _running(user, "locked")
    orm = Workspace.objects.select_related("owner").get(id=created.id)
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries:
            row = _locked(created.id)
            assert row.owner.username == user.username
        assert len(queries) == 1 and "FOR UPDATE OF" in queries[0]["sql"]
    assert _values(row) == _values(orm)
    assert _values(row.owner) == _values(orm.owner)
    assert row.env.reveal() == {"TOKEN": "s3cret"}
    assert row.backend_state == {"pid": 12, "nested": {"a": [1, 2]}}
    assert row.get_deferred_fields() == set() == orm.get_deferred_fields()
    assert row._state.db == orm._state.db and not row._state.adding
    with pytest.raises(Workspace.DoesNotExist):
        _locked(uuid.uuid4())


@pytest.mark.django_db(transaction=True)
def test_the_locked_read_locks_the_row_until_the_transaction_ends(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The row is committed here: no converge task for it, so that no worker of the suite runs a
    # cycle on it (and locks it) while the test looks at who holds its lock.
    monkeypatch.setattr(requests, "_enqueue_converge", lambda workspace_id: None)
    created = _running(user, "held")
    settings = connection.settings_dict
    other = psycopg2.connect(
        dbname=settings["NAME"],
        user=settings["USER"],
        host=settings["HOST"],
        port=settings["PORT"],
    )
    try:
        other.autocommit = True
        with other.cursor() as cursor:
            # The owner is read, not locked: another transaction may lock it meanwhile.
            with transaction.atomic():
                _locked(created.id)
                with pytest.raises(psycopg2.errors.LockNotAvailable):
                    cursor.execute(
                        "SELECT 1 FROM workspaces_workspace WHERE id = %s FOR UPDATE NOWAIT",
                        [str(created.id)],
                    )
                cursor.execute("SELECT 1 FROM auth_user WHERE id = %s FOR UPDATE NOWAIT", [user.id])
            cursor.execute(
                "SELECT 1 FROM workspaces_workspace WHERE id = %s FOR UPDATE NOWAIT",
                [str(created.id)],
            )
            assert cursor.fetchone() == (1,)
    finally:
        other.close()


def _row(workspace_id: uuid.UUID) -> dict[str, Any]:
    """The row's values but those that differ between two workspaces by design."""
    workspace = Workspace.objects.get(id=workspace_id)
    row = {name: value for name, (value, _) in _values(workspace).items()}
    for name in ("id", "name", "subdomain", "app_port", "isolation_uid", "created_at"):
        # (created_at: each row's insert; the other clocks are the test's)
        row.pop(name)
    row["env"] = workspace.env.reveal()  # sealed with a fresh nonce each time
    return row


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("to", "fields"),
    [
        # a start cycle's bump: an F copy, clocks, a text
        (
            S.PROVISIONING,
            {
                "generation": 5,
                "provisioning_started_at": "now",
                "last_error": "",
                "started_env_version": F("env_version"),
                "last_activity_at": "now",
            },
        ),
        # a stop: JSON, a boolean, an integer, the sealed env
        (
            S.STOPPING,
            {"is_running": True, "backend_state": {"x": [1, {"y": None}]}, "env": {"A": "b"}},
        ),
        # the same status again: the time-in-state clock stays
        (S.ONLINE, {"last_heartbeat_at": "now", "stop_reason": {}}),
    ],
)
def test_the_status_update_writes_what_it_is_given(
    user: Any, to: WorkspaceStatus, fields: dict[str, Any]
) -> None:
    """The same transition on two equal rows, one plain, one with a ``when`` condition that holds,
    and the same values written by a plain UPDATE on a third: the rows end up equal."""
    fast, slow = _running(user, "fast"), _running(user, "slow")
    plain = _running(user, "plain")
    now = timezone.now()
    values: dict[str, Any] = {
        name: now if value == "now" else value for name, value in fields.items()
    }
    with CaptureQueriesContext(connection) as queries:
        assert transition(fast.id, to, expect_generation=4, **values)
    assert len(queries) == 1 and queries[0]["sql"].startswith("UPDATE")
    assert transition(slow.id, to, expect_generation=4, when=Q(id=slow.id), **values)
    assert Workspace.objects.filter(id=plain.id).update(status=to, **values) == 1
    plain_row = _row(plain.id)
    for clock in ("updated_at", "status_changed_at"):
        plain_row.pop(clock)
    fast_row, slow_row = _row(fast.id), _row(slow.id)
    for clock in ("updated_at", "status_changed_at"):
        assert abs(fast_row.pop(clock) - slow_row.pop(clock)) < timedelta(seconds=5)
    assert fast_row == slow_row == plain_row
    assert fast_row["status"] == to
    changed_at = Workspace.objects.get(id=fast.id).status_changed_at
    assert changed_at is not None
    if to == S.ONLINE:
        assert changed_at < now  # online -> online keeps the clock
    else:
        assert changed_at >= now


@pytest.mark.django_db
def test_the_status_update_refuses_what_the_orm_refuses(user: Any) -> None:
    workspace = _running(user, "fenced")
    # A stale generation, a status the table does not allow from online, an exact status that
    # does not hold: nothing changes.
    assert not transition(workspace.id, S.STOPPING, expect_generation=3)
    assert not transition(workspace.id, S.ONLINE, expect_status=S.PROVISIONING)
    assert not transition(uuid.uuid4(), S.STOPPING)
    with pytest.raises(ValueError, match="transition table"):
        transition(workspace.id, S.ONLINE, expect_status=S.REMOVED)
    assert Workspace.objects.get(id=workspace.id).status == S.ONLINE
    assert transition(workspace.id, S.STOPPING, expect_status=S.ONLINE, expect_generation=4)
    assert Workspace.objects.get(id=workspace.id).status == S.STOPPING


@pytest.mark.django_db
def test_a_computed_value_is_written(user: Any) -> None:
    workspace = _running(user, "computed")
    seq = Workspace.objects.get(id=workspace.id).requested_seq
    assert transition(
        workspace.id,
        S.STOPPING,
        desired_state=DesiredState.STOPPED,
        requested_seq=F("requested_seq") + 1,
    )
    row = Workspace.objects.get(id=workspace.id)
    assert (row.status, row.desired_state, row.requested_seq) == (S.STOPPING, "stopped", seq + 1)


@pytest.mark.django_db
def test_the_event_insert_is_one_statement_and_what_the_orm_creates(user: Any) -> None:
    workspace = _running(user, "events")
    payload = {"action": "start", "nested": {"list": [1, "two", None]}, "unicode": "ü"}
    with transaction.atomic():
        locked = _locked(workspace.id)
        with CaptureQueriesContext(connection) as queries:
            event = record_event(
                workspace.id,
                EventType.PROVISIONING,
                EventSource.LIFECYCLE,
                5,
                payload,
                workspace=locked,
            )
        assert len(queries) == 1 and queries[0]["sql"].startswith("INSERT")
    orm = WorkspaceEvent.objects.create(
        workspace_id=workspace.id,
        type=EventType.PROVISIONING,
        source=EventSource.LIFECYCLE,
        generation=5,
        payload=payload,
        actor=event.actor,
    )
    stored = WorkspaceEvent.objects.get(id=event.id)
    assert event.id is not None and event.id < orm.id
    assert not event._state.adding and event._state.db == "default"
    mine, theirs = _values(stored), _values(WorkspaceEvent.objects.get(id=orm.id))
    for name in ("id", "created_at"):
        mine.pop(name), theirs.pop(name)
    assert mine == theirs
    assert _values(event)["payload"] == _values(stored)["payload"]
    assert event.actor == f"user:{user.username}"
    assert abs(stored.created_at - event.created_at) < timedelta(microseconds=1)


@pytest.mark.django_db
def test_the_agent_token_read_is_one_statement(user: Any) -> None:
    workspace = _running(user, "tokens")
    raw = services.issue_agent_token(workspace.id, 4)
    orm = AgentToken.objects.get(token_hash=services.hash_token(raw))
    with CaptureQueriesContext(connection) as queries:
        token = services.authenticate_agent(raw)
    assert len(queries) == 1
    assert token is not None and _values(token) == _values(orm)
    assert not token._state.adding
    assert services.authenticate_agent("not-a-token") is None


@pytest.mark.django_db
def test_the_api_token_read_is_one_statement_with_its_user(user: Any) -> None:
    key = services.issue_api_token(user)
    orm = ApiToken.objects.select_related("user").get(digest=services.hash_token(key))
    with CaptureQueriesContext(connection) as queries:
        token = selectors.api_token(key)
        assert token is not None and token.user.username == user.username
    assert len(queries) == 1  # the user came with the token
    assert _values(token) == _values(orm)
    assert _values(token.user) == _values(orm.user)
    assert selectors.api_token("not-a-key") is None


@pytest.mark.django_db
def test_ports_in_use_are_those_of_live_workspaces(user: Any, settings: Any) -> None:
    live, removed = _running(user, "live"), _running(user, "gone")
    Workspace.objects.filter(id=live.id).update(app_port=16001)
    Workspace.objects.filter(id=removed.id).update(
        app_port=16002, status=S.REMOVED, is_running=False
    )
    manifest = templates().get("jupyterlab")
    assert manifest is not None and manifest.app is not None and manifest.app.port is None
    settings.WORKSPACE_APP_PORT_RANGE = (16001, 16003)
    # A removed workspace's port is free again; a live one's never is.
    assert {requests._free_app_port(manifest) for _ in range(40)} == {16002, 16003}
    settings.WORKSPACE_APP_PORT_RANGE = (16001, 16001)
    with pytest.raises(services.InvalidInput, match="no free app port"):
        requests._free_app_port(manifest)


@pytest.mark.django_db
def test_the_backend_facts_are_one_fenced_update(user: Any) -> None:
    fast = _running(user, "fast")
    backend_state = {"pid": 7, "nested": {"ok": True}}
    with CaptureQueriesContext(connection) as queries:
        record_backend_facts(
            fast.id,
            4,
            is_running=True,
            backend_state=backend_state,
            started=True,
            handled_seq=1,
            config_populated=True,
        )
    assert len(queries) == 1 and queries[0]["sql"].startswith("UPDATE")
    row = Workspace.objects.get(id=fast.id)
    assert (row.is_running, row.backend_state, row.handled_seq) == (True, backend_state, 1)
    assert row.last_started_at == row.config_populated_at == row.updated_at
    # Fenced: another generation, or online/degraded with nothing running, changes nothing.
    with pytest.raises(LeaseLost):
        record_backend_facts(fast.id, 3, is_running=True, backend_state={}, handled_seq=0)
    with pytest.raises(LeaseLost):
        record_backend_facts(fast.id, 4, is_running=False, backend_state={}, handled_seq=0)
    assert Workspace.objects.get(id=fast.id).handled_seq == 1
    Workspace.objects.filter(id=fast.id).update(status=S.STOPPING)
    record_backend_facts(fast.id, 4, is_running=False, backend_state={}, handled_seq=0)
    assert Workspace.objects.get(id=fast.id).handled_seq == 0
