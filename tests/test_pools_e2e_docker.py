"""Warm pools end to end on the Docker backend: a real engine, a real Celery worker on a
templates folder of its own (tests/pool_support.py), real agents waiting in their containers."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User

from provisioning.backends import backend_named
from tests import pool_support as ps
from tests.conftest import client_for
from tests.support import RegistryListener, Worker, lifecycle_queue, wait_for
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventType, WorkspaceStatus

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]
S = WorkspaceStatus
QUEUE = "lifecycle-docker-pools"


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: Any) -> Path:
    return ps.pool_templates(tmp_path_factory.mktemp("pools") / "templates", ps.DOCKER_APP)


@pytest.fixture(scope="module")
def pool_worker(
    docker_engine: Any,
    worker_env: dict[str, str],
    registry_listener: RegistryListener,
    pool_dir: Path,
) -> Iterator[Worker]:
    env = {
        **worker_env,
        "WORKSPACE_BACKEND": "docker",
        "CELERY_LIFECYCLE_QUEUE": QUEUE,
        "PLATFORM_URL": registry_listener.url,
        "WORKSPACE_TEMPLATES_DIR": str(pool_dir),
    }
    # Its own lifecycle queue, and the sweep queue: the refills the claims ask for run here.
    queues = f"{QUEUE},{django_settings.CELERY_SWEEP_QUEUE}"
    worker = Worker(env, concurrency=3, name="docker-pools", queues=queues).start()
    yield worker
    worker.stop()
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-docker-pools-worker.log")


@pytest.fixture
def on_pools(pool_worker: Worker, pool_dir: Path, settings: Any) -> Iterator[Any]:
    ps.use_templates(settings, pool_dir)
    settings.WORKSPACE_BACKEND = "docker"
    with lifecycle_queue(QUEUE):
        yield pool_worker
        ps.remove_everything()


def _online(workspace_id: Any, timeout: float = 60) -> Workspace:
    return ps.wait_online(workspace_id, timeout)


def _app_page(workspace: Workspace) -> str:
    backend = backend_named("docker")
    assert workspace.app_port is not None
    return ps.page(backend.app_address(workspace.id, workspace.backend_state, workspace.app_port))


def test_docker_claimed_member_comes_online_with_the_claimers_env(
    on_pools, api, user, make_user, docker_engine
) -> None:
    members = ps.wait_pool_ready("pooled", 2)
    containers = {
        str(row.id): row.backend_state["container_id"]
        for row in Workspace.objects.filter(id__in=members)
    }
    member = Workspace.objects.get(id=sorted(members)[0])
    assert member.env.reveal() == {}
    # No secret of the platform's in a member's container: no token, no identity.
    environment = docker_engine.containers.get(member.backend_state["container_id"]).attrs
    names = {item.split("=", 1)[0] for item in environment["Config"]["Env"]}
    assert "WORKSPACE_POOL" in names
    assert not names & {"WORKSPACE_TOKEN", "WORKSPACE_ID", "GREETING"}
    staff = client_for(make_user("boss", staff=True))
    assert staff.get("/api/workspaces/").json()["count"] == 0
    response = api.post(
        "/api/workspaces/",
        {"name": "warm", "template": "pooled", "env": {"GREETING": "hello-docker"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["id"] in members
    online = _online(created["id"])
    assert online.owner_id == user.id
    # The member's own container took the claim: no cold start.
    assert online.backend_state["container_id"] == containers[created["id"]]
    assert _app_page(online) == f"hello-docker|{online.id}"
    claim = WorkspaceEvent.objects.get(
        workspace_id=online.id, type=EventType.PROVISIONING, generation=online.generation
    )
    assert claim.payload["claimed_from_pool"] == "pooled"
    # A restart replaces it cold, with the claimer's env.
    assert api.post(f"/api/workspaces/{online.id}/restart/").status_code == 202
    restarted = wait_for(
        lambda: (row := _online(online.id)).generation > online.generation and row, timeout=60
    )
    assert _app_page(restarted) == f"hello-docker|{online.id}"


def test_docker_team_of_pooled_templates_claims_its_members(on_pools, api) -> None:
    ps.team_comes_online_from_pools(api, _app_page, "container_id", timeout=90)


def test_docker_concurrent_creates_never_share_a_member_nor_an_env(
    on_pools, make_user, settings
) -> None:
    # No admission lock serialises the creates: the claim's own row lock is all that keeps
    # two of them from one member.
    settings.PROVISIONING_CONCURRENCY_LIMIT = 0
    members = ps.wait_pool_ready("burst", 3)
    made = ps.create_concurrently([make_user(f"racer{index}") for index in range(6)], "burst")
    ids = [str(workspace.id) for workspace in made]
    assert len(ids) == len(set(ids)) == 6
    assert len(set(ids) & members) == 3
    for workspace in made:
        online = _online(workspace.id, timeout=90)
        owner = User.objects.get(id=online.owner_id)
        assert _app_page(online) == f"hello-{owner.username}|{online.id}"


def test_docker_member_of_a_changed_template_is_never_claimed(on_pools, api, pool_dir) -> None:
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
        assert response.json()["id"] not in old
        online = _online(response.json()["id"])
        assert _app_page(online) == f"new|{online.id}"
        new = ps.wait_pool_ready("pooled", 2)
        assert not new & old
    finally:
        path.write_text(original)
        ps.use_templates_reload()


def test_docker_dead_member_is_replaced_and_refilled(on_pools, api, docker_engine) -> None:
    members = ps.wait_pool_ready("pooled", 2)
    dead = Workspace.objects.get(id=sorted(members)[0])
    docker_engine.containers.get(dead.backend_state["container_id"]).kill()
    ps.pools_sweep()
    assert Workspace.objects.get(id=dead.id).desired_state == "removed"
    response = api.post(
        "/api/workspaces/",
        {"name": "alive", "template": "pooled", "env": {"GREETING": "y"}},
        format="json",
    )
    assert response.json()["id"] != str(dead.id)
    online = _online(response.json()["id"])
    assert _app_page(online) == f"y|{online.id}"
    # The claim's refill and the sweep's replacement: two ready members, none of them the dead.
    refilled = wait_for(lambda: len(ids := ps.ready_ids("pooled")) == 2 and ids, timeout=60)
    assert str(dead.id) not in refilled
    services.request_remove(online.id)


def test_docker_claim_through_the_engine_when_the_volume_is_out_of_reach(
    on_pools, api, docker_engine
) -> None:
    """A worker that cannot write the member's volume (not on the engine's host) hands the claim
    over through the engine instead: into the container's own /tmp, never its volume."""
    members = ps.wait_pool_ready("pooled", 2)
    rows = Workspace.objects.filter(id__in=members)
    assert all(row.backend_state.get("claim_dir") for row in rows)  # this worker can
    for row in rows:
        state = {**row.backend_state, "claim_dir": ""}
        Workspace.objects.filter(id=row.id).update(backend_state=state)
    response = api.post(
        "/api/workspaces/",
        {"name": "remote", "template": "pooled", "env": {"GREETING": "through-engine"}},
        format="json",
    )
    assert response.json()["id"] in members
    online = _online(response.json()["id"])
    assert _app_page(online) == f"through-engine|{online.id}"
    container = docker_engine.containers.get(online.backend_state["container_id"])
    listing = container.exec_run(["ls", "-A", "/tmp", django_settings.DOCKER_CONFIG_MOUNT])
    assert b".workspace-claim" not in listing.output  # read, then deleted by the agent


def test_docker_member_of_a_rebuilt_image_is_retired(
    on_pools, api, pool_dir, docker_engine
) -> None:
    """The image is rebuilt under the template's tag (the manifest does not change): the sweep
    retires the members that run the old one and makes new ones from the new one."""
    docker_engine.images.get("workspace-agent:dev").tag("pool-test", "dev")
    folder = pool_dir / "imaged"
    folder.mkdir()
    (folder / "config.yaml").write_text(ps.manifest(ps.DOCKER_APP, 1, image="pool-test:dev"))
    try:
        ps.use_templates_reload()
        [old] = ps.wait_pool_ready("imaged", 1)
        old_image = docker_engine.containers.get(
            Workspace.objects.get(id=old).backend_state["container_id"]
        ).attrs["Image"]
        dockerfile = io.BytesIO(b"FROM workspace-agent:dev\nLABEL pool-test=rebuilt\n")
        docker_engine.images.build(fileobj=dockerfile, tag="pool-test:dev", rm=True)
        ps.pools_sweep()
        retired = Workspace.objects.get(id=old)
        assert (retired.desired_state, retired.requested_by) == ("removed", "pool:image changed")
        [new] = wait_for(lambda: ps.ready_ids("imaged") - {old}, timeout=60, interval=0.3)
        new_image = docker_engine.containers.get(
            Workspace.objects.get(id=new).backend_state["container_id"]
        ).attrs["Image"]
        assert new_image != old_image
        response = api.post(
            "/api/workspaces/",
            {"name": "rebuilt", "template": "imaged", "env": {"GREETING": "r"}},
            format="json",
        )
        assert response.json()["id"] == new
        assert _app_page(_online(new)) == f"r|{new}"
    finally:
        shutil.rmtree(folder)
        ps.use_templates_reload()
        ps.remove_everything()
        docker_engine.images.remove("pool-test:dev", force=True)


@pytest.mark.parametrize("through", ["volume", "engine"])
def test_docker_gvisor_member_is_claimed_in_its_sandbox(
    on_pools, api, pool_dir, gvisor_engine, through
) -> None:
    """A pool of a gVisor template: its member waits inside the sandbox and takes the claim
    (written into its volume, or through the engine into its /tmp) with no cold start."""
    folder = pool_dir / "sandboxed"
    folder.mkdir()
    (folder / "config.yaml").write_text(ps.manifest(ps.DOCKER_APP, 1) + "sandbox: gvisor\n")
    try:
        ps.use_templates_reload()
        [member] = ps.wait_pool_ready("sandboxed", 1)
        row = Workspace.objects.get(id=member)
        assert row.sandbox == "gvisor"
        container = gvisor_engine.containers.get(row.backend_state["container_id"])
        assert container.attrs["HostConfig"]["Runtime"] == django_settings.DOCKER_GVISOR_RUNTIME
        if through == "engine":
            state = {**row.backend_state, "claim_dir": ""}
            Workspace.objects.filter(id=row.id).update(backend_state=state)
        response = api.post(
            "/api/workspaces/",
            {"name": "boxed", "template": "sandboxed", "env": {"GREETING": "in-gvisor"}},
            format="json",
        )
        assert response.json()["id"] == member
        assert response.json()["sandbox"] == "gvisor"
        online = _online(member)
        assert online.backend_state["container_id"] == container.id  # the member's own
        assert _app_page(online) == f"in-gvisor|{member}"
    finally:
        shutil.rmtree(folder)
        ps.use_templates_reload()
        ps.remove_everything()
