"""Warm pools end to end on the process backend: a real Celery worker (on a templates folder of
its own, tests/pool_support.py), real agents waiting in their members, real claims."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from provisioning.backends import backend_named
from provisioning.backends.process_launch import alive
from tests import pool_support as ps
from tests.conftest import client_for
from tests.support import Worker, service_env, wait_for
from workspaces import metrics
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.services import pools
from workspaces.status import EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: Any) -> Path:
    return ps.pool_templates(tmp_path_factory.mktemp("pools") / "templates", ps.PROCESS_APP)


@pytest.fixture(scope="module")
def pool_worker(
    django_db_setup: Any, django_db_blocker: Any, live_server: Any, pool_dir: Path
) -> Iterator[Worker]:
    with django_db_blocker.unblock():
        env = service_env(live_server.url, WORKSPACE_TEMPLATES_DIR=str(pool_dir))
    worker = Worker(env, concurrency=3, name="pools").start()
    yield worker
    worker.stop()
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-pools-worker.log")


@pytest.fixture
def on_pools(pool_worker: Worker, pool_dir: Path, settings: Any, make_user: Any) -> Iterator[Any]:
    ps.use_templates(settings, pool_dir)
    yield pool_worker
    ps.remove_everything()


def _online(workspace_id: Any, timeout: float = 30) -> Workspace:
    return ps.wait_online(workspace_id, timeout)


def _app_page(workspace: Workspace) -> str:
    backend = backend_named("process")
    assert workspace.app_port is not None
    return ps.page(backend.app_address(workspace.id, workspace.backend_state, workspace.app_port))


def test_a_claimed_member_comes_online_with_the_claimers_env(
    on_pools, api, user, make_user
) -> None:
    members = ps.wait_pool_ready("pooled", 2)
    pids = {
        str(row.id): row.backend_state["pid"] for row in Workspace.objects.filter(id__in=members)
    }
    member = Workspace.objects.get(id=sorted(members)[0])
    assert member.owner.username == pools.pool_owner().username
    assert member.env.reveal() == {}  # a member holds nobody's env
    # Nor any secret of the platform's: no token, no identity in its process's environment.
    with open(f"/proc/{member.backend_state['pid']}/environ", "rb") as handle:
        names = {item.split(b"=", 1)[0] for item in handle.read().split(b"\0") if item}
    assert b"WORKSPACE_POOL" in names
    assert not names & {b"WORKSPACE_TOKEN", b"WORKSPACE_ID", b"GREETING"}
    # Visible to operators: /metrics (and the admin) show the pool.
    scraped = metrics.render()[0].decode()
    assert 'workspace_pool_ready{backend="process",template="pooled"} 2.0' in scraped
    assert 'workspace_pool_desired{backend="process",template="pooled"} 2.0' in scraped
    # Hidden from people: the API's list and retrieve, staff's included.
    staff = client_for(make_user("boss", staff=True))
    assert staff.get("/api/workspaces/").json()["count"] == 0
    assert staff.get(f"/api/workspaces/{member.id}/").status_code == 404

    response = api.post(
        "/api/workspaces/",
        {"name": "warm", "template": "pooled", "env": {"GREETING": "hello-claimer"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["id"] in members, "the create did not claim a ready member"
    online = _online(created["id"])
    assert online.owner_id == user.id and online.pool == "" and not online.claim_pending
    assert _app_page(online) == f"hello-claimer|{online.id}"
    claim = WorkspaceEvent.objects.get(
        workspace_id=online.id, type=EventType.PROVISIONING, generation=online.generation
    )
    assert claim.payload["action"] == "claim"
    assert claim.payload["claimed_from_pool"] == "pooled"
    # The member's own instance took the claim: no cold start (the same process runs).
    assert online.backend_state["pid"] == pids[created["id"]]
    # It is a workspace like any other: restart replaces it cold, with the same env.
    assert api.post(f"/api/workspaces/{online.id}/restart/").status_code == 202
    restarted = wait_for(
        lambda: (row := _online(online.id)).generation > online.generation and row,
        timeout=30,
    )
    assert _app_page(restarted) == f"hello-claimer|{online.id}"
    # The pool refills (the claim asked for it): two ready members again, the claimed one gone.
    again = ps.wait_pool_ready("pooled", 2)
    assert created["id"] not in again


def test_a_team_of_pooled_templates_claims_its_members(on_pools, api) -> None:
    ps.team_comes_online_from_pools(api, _app_page, "pid", timeout=60)


def test_concurrent_creates_never_share_a_member_nor_an_env(on_pools, make_user, settings) -> None:
    """Eight creates at once against a pool of three: each member is claimed at most once, the
    other creates start cold (or take a member the claims' refills made meanwhile), and every
    workspace serves its own claimer's env only."""
    # No admission lock serialises the creates: the claim's own row lock is all that keeps
    # two of them from one member.
    settings.PROVISIONING_CONCURRENCY_LIMIT = 0
    members = ps.wait_pool_ready("burst", 3)
    users = [make_user(f"racer{index}") for index in range(8)]
    made = ps.create_concurrently(users, "burst")
    ids = [str(workspace.id) for workspace in made]
    assert len(ids) == len(set(ids)) == 8, "one row became two workspaces"
    assert members <= set(ids), "a ready member was passed over"
    for workspace in made:
        online = _online(workspace.id, timeout=60)
        owner = User.objects.get(id=online.owner_id)
        assert _app_page(online) == f"hello-{owner.username}|{online.id}"
        events = WorkspaceEvent.objects.filter(workspace_id=online.id, type=EventType.PROVISIONING)
        claims = [e for e in events if e.payload.get("action") == "claim"]
        assert len(claims) <= 1, "a member was handed over twice"
        assert len(claims) == 1 or str(online.id) not in members


def test_a_member_of_a_changed_template_is_never_claimed(on_pools, api, pool_dir) -> None:
    old = ps.wait_pool_ready("pooled", 2)
    path = pool_dir / "pooled" / "config.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("# ", "# changed ", 1))
        ps.use_templates_reload()
        response = api.post(
            "/api/workspaces/",
            {"name": "fresh", "template": "pooled", "env": {"GREETING": "new"}},
            format="json",
        )
        assert response.status_code == 201
        assert response.json()["id"] not in old, "a member of the old template was claimed"
        online = _online(response.json()["id"])
        assert _app_page(online) == f"new|{online.id}"
        # The sweep retires the old members and makes new ones from the template as it is.
        new = ps.wait_pool_ready("pooled", 2)
        assert not new & old
        retired = Workspace.objects.filter(id__in=old)
        assert all(row.desired_state == "removed" for row in retired)
    finally:
        path.write_text(original)
        ps.use_templates_reload()


def test_the_pool_refills_after_a_burst(on_pools, make_user) -> None:
    members = ps.wait_pool_ready("burst", 3)
    made = ps.create_concurrently([make_user(f"b{index}") for index in range(3)], "burst")
    assert {str(workspace.id) for workspace in made} == members
    # The claims asked for refills: three new members, without a sweep from here.
    refilled = wait_for(
        lambda: len(ids := ps.ready_ids("burst")) == 3 and ids,
        timeout=60,
        message="the pool refilled by the claims' refill tasks",
    )
    assert not set(refilled) & members


def test_a_dead_member_is_replaced_not_claimed(on_pools, api) -> None:
    members = ps.wait_pool_ready("pooled", 2)
    dead = Workspace.objects.get(id=sorted(members)[0])
    pid, start_time = dead.backend_state["pid"], dead.backend_state["start_time"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid, start_time), timeout=10, message="the member's agent gone")
    ps.pools_sweep()  # the sweep sees the backend run nothing for it: retired
    assert Workspace.objects.get(id=dead.id).desired_state == "removed"
    response = api.post(
        "/api/workspaces/",
        {"name": "alive", "template": "pooled", "env": {"GREETING": "x"}},
        format="json",
    )
    assert response.status_code == 201
    assert response.json()["id"] != str(dead.id)
    _online(response.json()["id"])
    replaced = ps.wait_pool_ready("pooled", 2)
    assert str(dead.id) not in replaced


def test_a_member_that_died_unseen_is_started_cold_for_its_claimer(on_pools, api) -> None:
    """No sweep ran since the member died: the create claims it, the hand-over fails, and the
    cycle starts the workspace cold; the create never fails because of the pool."""
    members = ps.wait_pool_ready("pooled", 2)
    for member in Workspace.objects.filter(id__in=members):
        os.kill(member.backend_state["pid"], signal.SIGKILL)
    response = api.post(
        "/api/workspaces/",
        {"name": "fallback", "template": "pooled", "env": {"GREETING": "cold"}},
        format="json",
    )
    assert response.status_code == 201
    online = _online(response.json()["id"])
    assert _app_page(online) == f"cold|{online.id}"


def test_a_create_lacking_required_env_never_takes_a_member(on_pools, api) -> None:
    """Preflight comes before the claim: the create fails its preflight as without a pool, and
    the member stays for a create that can use it."""
    members = ps.wait_pool_ready("keyed", 1)
    response = api.post(
        "/api/workspaces/",
        {"name": "cold", "template": "keyed", "env": {"GREETING": "x"}},
        format="json",
    )
    assert response.status_code == 201
    assert response.json()["id"] not in members
    failed = wait_for(
        lambda: (row := Workspace.objects.get(id=response.json()["id"])).status == S.FAILED and row,
        timeout=20,
    )
    assert "API_KEY" in failed.last_error
    assert ps.ready_ids("keyed") == members
    response = api.post(
        "/api/workspaces/",
        {"name": "keyed", "template": "keyed", "env": {"GREETING": "k", "API_KEY": "s"}},
        format="json",
    )
    assert response.json()["id"] in members
