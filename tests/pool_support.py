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
from workspaces.models import Workspace
from workspaces.services import pools
from workspaces.services.claims import ready_members
from workspaces.status import WorkspaceStatus

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


def pool_templates(directory: Path, app_command: str) -> Path:
    """The shipped templates plus ``pooled`` (a pool of 2) and ``burst`` (a pool of 3)."""
    return write_templates(
        directory,
        {
            "pooled": manifest(app_command, 2),
            "burst": manifest(app_command, 3),
            "keyed": manifest(app_command, 1, required="API_KEY"),
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
