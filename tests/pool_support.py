"""What the warm pool tests share (tests/test_pools_e2e.py, tests/test_pools_e2e_docker.py): a
templates folder of their own (a pool in the session's templates would be filled by every
module's sweeps), its workers, and waits on the pool's state."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import close_old_connections, connection

from tests.support import wait_for, write_templates
from workspaces import services
from workspaces.manifests import invalidate_templates, templates
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.services import pools
from workspaces.services.claims import ready_members
from workspaces.status import EventType, WorkspaceStatus

S = WorkspaceStatus

# The app serves the env it started with: the claimer's GREETING and the workspace's id (so a page
# with another's env or id is caught), where the platform says it listens (WORKSPACE_APP_HOST: in
# a process workspace's own namespace, every address). {python} is the process backend's app
# interpreter; the Docker variant serves the page with busybox httpd.
PROCESS_APP = (
    'mkdir -p "$HOME/www" && printf \'%s|%s\' "$GREETING" "$WORKSPACE_ID" > '
    '"$HOME/www/index.html" && cd "$HOME/www" && exec {python} -m http.server --bind '
    '"${WORKSPACE_APP_HOST:-127.0.0.1}" "$WORKSPACE_APP_PORT"'
)
DOCKER_APP = (
    'mkdir -p /tmp/www && printf \'%s|%s\' "$GREETING" "$WORKSPACE_ID" > /tmp/www/index.html '
    '&& exec httpd -f -p "$WORKSPACE_APP_HOST:$WORKSPACE_APP_PORT" -h /tmp/www'
)


def manifest(
    app_command: str,
    size: int,
    note: str = "",
    required: str = "",
    image: str = "workspace-agent:dev",
) -> str:
    return (
        f"# {note}\n"
        "runtime: shell\n"
        + (f"runtime_config:\n  required_env: [{required}]\n" if required else "")
        + f"image: {image}\n"
        "env:\n  AGENT_HEARTBEAT_SECONDS: '1'\n"
        f"app:\n  port: auto\n  health_path: /\n  command: {json.dumps(app_command)}\n"
        f"pool:\n  size: {size}\n"
    )


# A team of pooled templates: its members are claimed from their own pools (``pooled`` twice,
# ``burst`` once); the parent (a team template keeps no pool) starts cold.
TEAM = "pooled-team"
TEAM_MEMBERS = ("pooled", "pooled", "burst")


def team_manifest(app_command: str, image: str = "workspace-agent:dev") -> str:
    return (
        "runtime: shell\n"
        f"image: {image}\n"
        "env:\n  AGENT_HEARTBEAT_SECONDS: '1'\n"
        f"app:\n  port: auto\n  health_path: /\n  command: {json.dumps(app_command)}\n"
        "members:\n" + "".join(f"  - {member}\n" for member in TEAM_MEMBERS)
    )


def pool_templates(directory: Path, app_command: str) -> Path:
    """The shipped templates plus ``pooled`` (a pool of 2), ``burst`` (a pool of 3), ``keyed``
    (a pool of 1 that requires API_KEY) and the team ``pooled-team``."""
    return write_templates(
        directory,
        {
            "pooled": manifest(app_command, 2),
            "burst": manifest(app_command, 3),
            "keyed": manifest(app_command, 1, required="API_KEY"),
            TEAM: team_manifest(app_command),
        },
    )


def use_templates(settings: Any, directory: Path) -> None:
    settings.WORKSPACE_TEMPLATES_DIR = directory
    invalidate_templates()


def use_templates_reload() -> None:
    """The test changed a manifest: read the folder again now (the worker does within 1 s)."""
    invalidate_templates()


def ready_ids(template: str) -> set[str]:
    manifest_ = templates().get(template)
    assert manifest_ is not None
    from django.conf import settings

    rows = Workspace.objects.filter(ready_members(manifest_, settings.WORKSPACE_BACKEND))
    return {str(i) for i in rows.values_list("id", flat=True)}


def wait_pool_ready(template: str, count: int, timeout: float = 60) -> set[str]:
    """Sweep (as beat would) until ``count`` members of ``template`` are ready; their ids."""

    def full() -> set[str] | None:
        pools_sweep()
        ids = ready_ids(template)
        return ids if len(ids) >= count else None

    return set(wait_for(full, timeout=timeout, interval=0.3, message=f"pool {template} ready"))


def pools_sweep() -> None:
    # The engine's sweep, as beat runs it (the test process is on the worker's backend).
    from provisioning import pools as engine_pools

    engine_pools.sweep()


def page(address: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(f"http://{address}/", timeout=timeout) as answer:
        return str(answer.read().decode())


def create_concurrently(users: list[Any], template: str) -> list[Workspace]:
    """One create per user, all released at once by a barrier, each in its own thread (its own
    connection and transaction): the claim's race."""
    barrier = threading.Barrier(len(users))
    made: list[Workspace] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def create(user: Any, index: int) -> None:
        try:
            barrier.wait(timeout=30)
            workspace = services.create_workspace(
                owner=user,
                name=f"race-{index}",
                template=template,
                env={"GREETING": f"hello-{user.username}"},
            )
            with lock:
                made.append(workspace)
        except BaseException as exc:  # reported below, in the test's thread
            with lock:
                errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=create, args=(user, index)) for index, user in enumerate(users)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    close_old_connections()
    assert not errors, errors
    return made


def wait_online(workspace_id: Any, timeout: float = 30) -> Workspace:
    def check() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        assert row.status != S.FAILED, row.last_error
        return row if row.status == S.ONLINE else None

    return wait_for(check, timeout=timeout, interval=0.05, message=f"{workspace_id} online")


def remove_everything(timeout: float = 90) -> None:
    """Every member and workspace goes, so the next test starts from an empty pool (a refill a
    claim asked for may still insert members meanwhile: they go too)."""

    def all_removed() -> bool:
        live = Workspace.objects.exclude(status=S.REMOVED)
        for workspace_id in live.exclude(desired_state="removed").values_list("id", flat=True):
            services.request_remove(workspace_id)
        return not live.exists()

    wait_for(all_removed, timeout=timeout, interval=0.5, message="every workspace removed")


def members_of(template: str) -> set[str]:
    return {str(i) for i in pools.members().filter(pool=template).values_list("id", flat=True)}


Waiter = Callable[..., Any]


def team_comes_online_from_pools(
    api: Any, app_page: Callable[[Workspace], str], instance_key: str, timeout: float
) -> None:
    """POST /api/teams/ of ``pooled-team`` with its members' pools full: each member is a ready
    member of its own template's pool, handed over in its own instance (``instance_key`` of its
    backend state is the member's), and serves the team's env and its own id; the parent starts
    cold and serves them too; the API shows the parent with its members and each member with
    its parent, and removing the parent removes the claimed members."""
    burst = wait_pool_ready("burst", 3)
    pooled = wait_pool_ready("pooled", 2)
    ready = Workspace.objects.filter(id__in=pooled | burst)
    instances = {str(row.id): row.backend_state[instance_key] for row in ready}
    response = api.post(
        "/api/teams/",
        {"name": "crew", "template": TEAM, "env": {"GREETING": "hello-team"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    parent_id = body["parent"]["id"]
    members = {member["name"]: member["id"] for member in body["members"]}
    assert set(members) == {"crew-pooled-1", "crew-pooled-2", "crew-burst"}
    assert {members["crew-pooled-1"], members["crew-pooled-2"]} == pooled, "a member started cold"
    # The pool's oldest ready member: all three were ready, so it is one of them.
    assert members["crew-burst"] in burst, "a member started cold"
    assert parent_id not in instances
    assert {member["id"] for member in body["parent"]["members"]} == set(members.values())

    for workspace_id in [parent_id, *members.values()]:
        online = wait_online(workspace_id, timeout)
        assert app_page(online) == f"hello-team|{workspace_id}"
    for workspace_id in members.values():
        online = Workspace.objects.get(id=workspace_id)
        # The member's own instance took the claim: no cold start.
        assert online.backend_state[instance_key] == instances[workspace_id]
        began = WorkspaceEvent.objects.get(
            workspace_id=workspace_id, type=EventType.PROVISIONING, generation=online.generation
        )
        assert began.payload["action"] == "claim"
        assert began.payload["claimed_from_pool"] == online.template

    parent = api.get(f"/api/workspaces/{parent_id}/").json()
    assert parent["parent"] is None
    assert {member["id"] for member in parent["members"]} == set(members.values())
    assert {member["status"] for member in parent["members"]} == {S.ONLINE}
    for workspace_id in members.values():
        assert api.get(f"/api/workspaces/{workspace_id}/").json()["parent"] == parent_id
    removed = api.delete(f"/api/workspaces/{parent_id}/")
    assert removed.status_code == 202, removed.content
    assert {member["status"] for member in removed.json()["members"]} == {S.REMOVING}
