"""Limits: the per-user workspace quota and the platform's cap on cycles in flight. Over a limit
is a 429 with Retry-After and nothing is written, also when many requests arrive at once (the
concurrency tests send them together to the live server)."""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import client_for
from tests.provisioning.test_reconciler import make_row
from tests.support import lifecycle_queue
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.services.limits import in_flight
from workspaces.status import WorkspaceStatus

S = WorkspaceStatus


def _create(api: Any, name: str, template: str = "shell-default") -> Any:
    return api.post("/api/workspaces/", {"name": name, "template": template}, format="json")


def _assert_429(response: Any, retry_after: int, *words: str) -> None:
    assert response.status_code == 429, response.content
    assert response["Retry-After"] == str(retry_after)
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


# --- the quota ------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_quota_refuses_the_next_workspace_and_writes_nothing(user, api, settings) -> None:
    settings.WORKSPACE_QUOTA_PER_USER = 3
    settings.WORKSPACE_QUOTA_RETRY_AFTER_SECONDS = 42
    for index in range(3):
        assert _create(api, f"w{index}").status_code == 201
    events = WorkspaceEvent.objects.count()
    _assert_429(_create(api, "w3"), 42, "quota", "3 of 3", "WORKSPACE_QUOTA_PER_USER")
    assert Workspace.objects.filter(owner=user).count() == 3
    assert not Workspace.objects.filter(name="w3").exists()
    assert WorkspaceEvent.objects.count() == events
    # Validation still comes first: a bad request over the quota is a 400 naming the field.
    assert _create(api, "w3", template="nope").status_code == 400


@pytest.mark.django_db
def test_removed_workspaces_do_not_count_and_other_owners_are_separate(
    user, other_user, api, settings
) -> None:
    settings.WORKSPACE_QUOTA_PER_USER = 2
    make_row(user, S.REMOVED)
    make_row(user, S.REMOVED)
    make_row(user, S.STOPPED)
    assert _create(api, "one").status_code == 201
    assert _create(api, "two").status_code == 429
    # A workspace being removed still holds its resources, so it still counts.
    services.request_remove(Workspace.objects.get(name="one").id)
    assert _create(api, "two").status_code == 429
    Workspace.objects.filter(name="one").update(status=S.REMOVED, is_running=False)
    assert _create(api, "two").status_code == 201
    theirs = client_for(other_user)
    assert _create(theirs, "one").status_code == 201
    assert _create(theirs, "two").status_code == 201


@pytest.mark.django_db
def test_staff_are_exempt_from_the_quota(make_user, settings) -> None:
    settings.WORKSPACE_QUOTA_PER_USER = 1
    staff = client_for(make_user("root", staff=True))
    for index in range(3):
        assert _create(staff, f"w{index}").status_code == 201


@pytest.mark.django_db
def test_a_team_counts_its_parent_and_every_member(user, api, settings) -> None:
    # team-default: a parent and 6 members, 7 workspaces.
    settings.WORKSPACE_QUOTA_PER_USER = 8
    assert _create(api, "solo").status_code == 201
    response = api.post("/api/teams/", {"name": "squad", "template": "team-default"}, format="json")
    assert response.status_code == 201, response.content
    settings.WORKSPACE_QUOTA_PER_USER = 14
    response = api.post("/api/teams/", {"name": "crew", "template": "team-default"}, format="json")
    _assert_429(response, 60, "8 of 14", "adds 7")
    assert Workspace.objects.filter(owner=user).count() == 8
    assert not Workspace.objects.filter(name__startswith="crew").exists()


@pytest.mark.django_db
def test_quota_zero_means_no_quota(api, settings) -> None:
    settings.WORKSPACE_QUOTA_PER_USER = 0
    settings.PROVISIONING_CONCURRENCY_LIMIT = 0
    for index in range(5):
        assert _create(api, f"w{index}").status_code == 201


# --- cycles in flight -------------------------------------------------------------------------
@pytest.mark.django_db
def test_concurrency_cap_refuses_new_cycles_but_never_stop_or_delete(
    user, other_user, make_user, api, settings
) -> None:
    settings.PROVISIONING_CONCURRENCY_LIMIT = 2
    settings.PROVISIONING_RETRY_AFTER_SECONDS = 7
    stopped = make_row(user, S.STOPPED)
    online = make_row(user, S.ONLINE)
    assert _create(api, "a").status_code == 201
    assert _create(client_for(other_user), "b").status_code == 201
    assert Workspace.objects.filter(in_flight()).count() == 2
    # The cap is global: another owner, and staff, are refused alike.
    for client in (api, client_for(other_user), client_for(make_user("root", staff=True))):
        _assert_429(_create(client, "c"), 7, "2 cycles in flight", "PROVISIONING_CONCURRENCY_LIMIT")
    _assert_429(api.post(f"/api/workspaces/{stopped.id}/start/"), 7)
    _assert_429(api.post(f"/api/workspaces/{online.id}/restart/"), 7)
    stopped.refresh_from_db()
    online.refresh_from_db()
    assert (stopped.requested_seq, online.requested_seq) == (1, 1)
    # A workspace already in flight takes more restarts: they coalesce into its pending cycle.
    mine = Workspace.objects.get(name="a")
    for _ in range(3):
        assert api.post(f"/api/workspaces/{mine.id}/restart/").status_code == 202
    # Stop and delete free resources: never refused.
    assert api.post(f"/api/workspaces/{online.id}/stop/").status_code == 202
    assert api.delete(f"/api/workspaces/{stopped.id}/").status_code == 202
    assert Workspace.objects.filter(in_flight()).count() == 4
    assert not Workspace.objects.filter(name="c").exists()


@pytest.mark.django_db
def test_a_team_counts_every_member_against_the_cap(api, settings) -> None:
    settings.PROVISIONING_CONCURRENCY_LIMIT = 6
    response = api.post("/api/teams/", {"name": "squad", "template": "team-default"}, format="json")
    _assert_429(response, 10, "0 cycles in flight")
    assert not Workspace.objects.exists()
    settings.PROVISIONING_CONCURRENCY_LIMIT = 7
    response = api.post("/api/teams/", {"name": "squad", "template": "team-default"}, format="json")
    assert response.status_code == 201


@pytest.mark.django_db
def test_finished_cycles_free_the_cap(user, api, settings) -> None:
    settings.PROVISIONING_CONCURRENCY_LIMIT = 1
    assert _create(api, "a").status_code == 201
    assert _create(api, "b").status_code == 429
    # The agent registered and the cycle finished: the row is no longer in flight.
    Workspace.objects.filter(name="a").update(
        status=S.ONLINE, is_running=True, last_started_at="2026-01-01T00:00Z", handled_seq=1
    )
    assert _create(api, "b").status_code == 201


@pytest.mark.django_db
def test_operators_see_the_refusal(user, settings) -> None:
    settings.PROVISIONING_CONCURRENCY_LIMIT = 1
    make_row(user, S.PROVISIONING)
    stopped = make_row(user, S.STOPPED)
    with pytest.raises(CommandError, match="PROVISIONING_CONCURRENCY_LIMIT"):
        call_command("workspace", "start", str(stopped.id))


# --- many requests at once, against the live server ---------------------------------------------
def _post_at_once(
    url: str, requests: list[tuple[str, str, dict[str, Any]]], accepted: int = 201
) -> list[int]:
    """Send every (token, path, body) from its own thread and connection, released together."""
    target = urlparse(url)
    ready = threading.Barrier(len(requests))

    def send(request: tuple[str, str, dict[str, Any]]) -> int:
        token, path, body = request
        ready.wait()
        # The test server's listen backlog is 10: under load a connection beyond it is reset
        # before the server accepts it, so that request was never made; send it again. (The
        # database counts the tests assert hold whatever the answers.)
        for _ in range(10):
            conn = http.client.HTTPConnection(str(target.hostname), target.port, timeout=120)
            try:
                conn.request(
                    "POST",
                    path,
                    json.dumps(body),
                    {"Authorization": f"Token {token}", "Content-Type": "application/json"},
                )
                response = conn.getresponse()
                payload = json.loads(response.read())
            except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
                continue
            finally:
                conn.close()
            if response.status == 429:
                assert response.getheader("Retry-After"), payload
            assert response.status in (accepted, 429), (response.status, payload)
            return response.status
        raise AssertionError(f"could not connect to send {path}")

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))


@pytest.fixture
def no_worker() -> Any:
    """The live tests' converge tasks go to a queue no worker consumes: a session worker that ran
    them would finish cycles (and free room under the cap) while the test counts, and would write
    to rows the test's teardown is truncating."""
    with lifecycle_queue("limits-nobody"):
        yield


def _token(user: Any) -> str:
    return services.issue_api_token(user)


@pytest.mark.django_db(transaction=True)
def test_simultaneous_creates_never_exceed_the_quota(
    user, live_server, settings, no_worker
) -> None:
    settings.WORKSPACE_QUOTA_PER_USER = 5
    token = _token(user)
    requests = [
        (token, "/api/workspaces/", {"name": f"w{index}", "template": "shell-default"})
        for index in range(30)
    ]
    statuses = Counter(_post_at_once(live_server.url, requests))
    assert statuses == {201: 5, 429: 25}
    assert Workspace.objects.filter(owner=user).count() == 5


@pytest.mark.django_db(transaction=True)
def test_simultaneous_creates_and_teams_never_exceed_the_quota(
    user, live_server, settings, no_worker
) -> None:
    # 7 per team, 1 per workspace; at most 10 in all, whichever requests win.
    settings.WORKSPACE_QUOTA_PER_USER = 10
    token = _token(user)
    requests = [
        (token, "/api/teams/", {"name": f"t{index}", "template": "team-default"})
        for index in range(4)
    ] + [
        (token, "/api/workspaces/", {"name": f"w{index}", "template": "shell-default"})
        for index in range(16)
    ]
    _post_at_once(live_server.url, requests)
    # Each single create is admitted while there is room and there are more singles than room,
    # so the quota ends exactly full.
    assert Workspace.objects.filter(owner=user).count() == 10
    # Every team is whole or absent.
    for parent in Workspace.objects.filter(owner=user, parent=None, template="team-default"):
        assert Workspace.objects.filter(parent=parent).count() == 6


@pytest.mark.django_db(transaction=True)
def test_simultaneous_requests_of_many_owners_never_exceed_the_cap(
    make_user, live_server, settings, no_worker
) -> None:
    settings.WORKSPACE_QUOTA_PER_USER = 0
    settings.PROVISIONING_CONCURRENCY_LIMIT = 6
    owners = [make_user(f"user{index}") for index in range(3)]
    stopped = [make_row(owner, S.STOPPED) for owner in owners for _ in range(2)]
    requests = [
        (_token(owner), "/api/workspaces/", {"name": f"w{index}", "template": "shell-default"})
        for owner in owners
        for index in range(6)
    ]
    starts: list[tuple[str, str, dict[str, Any]]] = [
        (_token(row.owner), f"/api/workspaces/{row.id}/start/", {}) for row in stopped
    ]
    # Creates and starts race for the same six places, each from its own thread.
    with ThreadPoolExecutor(max_workers=2) as pool:
        created = pool.submit(_post_at_once, live_server.url, requests)
        started = pool.submit(_post_at_once, live_server.url, starts, 202)
        statuses = Counter(created.result()) + Counter(started.result())
    assert statuses[201] + statuses[202] == 6, statuses
    assert statuses[429] == len(requests) + len(starts) - 6
    assert Workspace.objects.filter(in_flight()).count() == 6
