"""A request that changed something answers what it did, even when the database connection is
lost right after the commit (PostgreSQL restarted, the backend terminated): everything the answer
shows is read before the commit. Otherwise the client gets a 503 for a request that took effect,
and its retry a different answer (a retried start: 409 "already provisioning"), so it believes its
intent was refused. The fault suite (tests/test_faults.py) terminates real connections under a
storm; here every query after the commit fails, deterministically."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

from tests.support import lifecycle_queue
from workspaces.models import Workspace
from workspaces.status import DesiredState, WorkspaceStatus

pytestmark = pytest.mark.django_db(transaction=True)
S = WorkspaceStatus


@pytest.fixture(autouse=True)
def _no_worker_runs_the_cycles() -> Iterator[None]:
    """The requests' converge tasks go to a queue no worker of the session consumes: a worker
    running them would hold rows while this transactional test's teardown truncates the tables
    (a deadlock), and the test is about the answers, not the cycles."""
    with lifecycle_queue("answer-after-commit-nobody"):
        yield


@contextmanager
def connection_lost_after_commit() -> Iterator[list[str]]:
    """Every query after the next COMMIT raises what psycopg2 raises for a terminated backend.
    Yields the statements refused that way (for the failure message)."""
    refused: list[str] = []
    committed = False
    wrapper = connections[DEFAULT_DB_ALIAS]
    real_commit = wrapper.commit

    def commit() -> None:
        nonlocal committed
        real_commit()
        committed = True

    def guard(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if committed:
            refused.append(sql)
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    wrapper.commit = commit  # type: ignore[method-assign]
    try:
        with wrapper.execute_wrapper(guard):
            yield refused
    finally:
        del wrapper.commit


def _call(api: Any, method: str, path: str, **kwargs: Any) -> Any:
    with connection_lost_after_commit() as refused:
        response = getattr(api, method)(path, format="json", **kwargs)
    assert response.status_code < 500, (response.status_code, response.content, refused)
    assert refused == [], refused
    return response


def test_lifecycle_requests_answer_without_the_database_after_their_commit(
    api: Any, user: Any
) -> None:
    created = _call(
        api, "post", "/api/workspaces/", data={"name": "dev", "template": "shell-default"}
    )
    assert created.status_code == 201, created.content
    assert created.json()["status"] == S.PROVISIONING
    workspace_id = created.json()["id"]
    base = f"/api/workspaces/{workspace_id}/"

    stopped = _call(api, "post", base + "stop/")
    assert stopped.status_code == 202, stopped.content
    assert stopped.json()["status"] == S.STOPPING
    assert stopped.json()["desired_state"] == DesiredState.STOPPED

    started = _call(api, "post", base + "start/")
    assert started.status_code == 202, started.content
    assert started.json()["desired_state"] == DesiredState.RUNNING

    restarted = _call(api, "post", base + "restart/")
    assert restarted.status_code == 202, restarted.content

    patched = _call(api, "patch", base, data={"name": "dev2", "env": {"A": "1"}})
    assert patched.status_code == 200, patched.content
    assert patched.json()["name"] == "dev2"
    assert patched.json()["pending_changes"] == ["env"]

    removed = _call(api, "delete", base)
    assert removed.status_code == 202, removed.content
    assert removed.json()["status"] == S.REMOVING

    # Each answer matched what was committed.
    row = Workspace.objects.get(id=workspace_id)
    assert (row.name, row.desired_state, row.requested_seq) == ("dev2", DesiredState.REMOVED, 5)


def test_team_requests_answer_without_the_database_after_their_commit(api: Any, user: Any) -> None:
    created = _call(api, "post", "/api/teams/", data={"name": "crew", "template": "team-default"})
    assert created.status_code == 201, created.content
    team = created.json()
    assert team["members"] and len(team["parent"]["members"]) == len(team["members"])

    removed = _call(api, "delete", f"/api/workspaces/{team['parent']['id']}/")
    assert removed.status_code == 202, removed.content
    assert [member["status"] for member in removed.json()["members"]] == [S.REMOVING] * len(
        team["members"]
    )
    parent = Workspace.objects.get(id=team["parent"]["id"])
    assert parent.desired_state == DesiredState.REMOVED
    # Every member's removal was recorded (a worker of the suite may already be carrying it out).
    members = Workspace.objects.filter(parent=parent)
    assert members.count() == len(team["members"])
    assert not members.exclude(desired_state=DesiredState.REMOVED).exists()
