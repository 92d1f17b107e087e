"""Workspace isolation on the process backend, tried as an attacker would: real workspaces made
through the API and run by a real worker, each as its own uid; the probe runs inside workspace A
(A's uid and gid, no groups, A's mount namespace) and tries to reach what it must not."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends.process_firewall import registry_port
from tests.isolation import create_online
from tests.support import Worker, free_port, lifecycle_queue, wait_for
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus
PROBE = Path(__file__).with_name("probe.py")
SECRET = "b-secret-value-0c1f3e"
PG_SOCKET = "/var/run/postgresql/.s.PGSQL.5432"


# This module's worker consumes a queue of its own and lives as long as the module: the
# session's shared worker would otherwise start here, early, and run the cycles other modules'
# transactional tests enqueue but never wait for, racing their teardown.
QUEUE = "lifecycle-isolation"


@pytest.fixture(scope="module")
def isolation_worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    worker = Worker(worker_env, concurrency=2, name="isolation", queues=QUEUE).start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def _own_queue(use_session_templates: Path) -> Iterator[None]:
    with lifecycle_queue(QUEUE):
        yield


def _listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _probe_as(workspace: Workspace | None, targets: dict[str, Any]) -> dict[str, Any]:
    """Run the probe inside ``workspace`` (its uid, gid, no groups, its mount namespace), or as
    the platform itself when None (the control: the same probe does reach those targets)."""
    argv = [settings.WORKSPACE_PYTHON, str(PROBE), json.dumps(targets)]
    if workspace is not None:
        pid = workspace.backend_state["pid"]
        uid = workspace.isolation_uid
        argv = [
            "nsenter",
            f"--target={pid}",
            "--mount",
            "--",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            *argv,
        ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_a_workspace_reaches_nothing_of_the_host_or_another_workspace(
    api, isolation_worker, instances
) -> None:
    assert settings.WORKSPACE_PROCESS_ISOLATION == "uid"
    b_port = free_port()
    b_env = {"APP_PORT": str(b_port), "B_SECRET": SECRET}
    b = create_online(api, "b", "shell-listener", b_env, timeout=60)
    a = create_online(api, "a", "shell-default", {}, timeout=60)
    # A's agent registered (it is online) through the one port it may reach.
    assert a.isolation_uid is not None and b.isolation_uid is not None
    assert a.isolation_uid != b.isolation_uid
    wait_for(lambda: _listening(b_port), timeout=30, message="B's app listening")

    b_pid = b.backend_state["pid"]
    b_dir = Path(settings.WORKSPACE_DATA_DIR) / str(b.id)
    (b_dir / "configs" / "secret.txt").write_text(SECRET)
    for folder in ("configs", "home"):
        info = (b_dir / folder).stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (b.isolation_uid, 0o700)
    redis_port = int(settings.REDIS_URL.split(":")[-1].split("/")[0])
    engine = settings.DOCKER_HOST
    engine_socket = [engine.removeprefix("unix://")] if engine.startswith("unix://") else []
    targets = {
        "tcp": [
            ["127.0.0.1", 5432],
            ["127.0.0.1", redis_port],
            ["::1", redis_port],
            ["127.0.0.1", b_port],
            ["127.0.0.1", registry_port()],
        ],
        "unix": [PG_SOCKET, *engine_socket],
        "read": [
            f"/proc/{b_pid}/environ",
            str(b_dir / "configs" / "secret.txt"),
            str(b_dir / "instance.json"),
        ],
        "list": [str(b_dir / "home"), str(b_dir / "configs")],
        "kill": [b_pid],
    }

    # The control: the platform's own user reaches all of it, so a refusal below is the
    # boundary's doing, not a broken probe.
    control = _probe_as(None, targets)
    assert control["tcp"]["127.0.0.1:5432"] == "connected"
    assert control["tcp"][f"127.0.0.1:{b_port}"] == "connected"
    assert control["read"][f"/proc/{b_pid}/environ"] == "read"
    if os.path.exists(PG_SOCKET):
        assert control["unix"][PG_SOCKET] == "connected"
    for path in engine_socket:
        assert control["unix"][path] == "connected"

    inside = _probe_as(a, targets)
    assert (inside["uid"], inside["groups"]) == (a.isolation_uid, [])
    assert int(inside["cap_eff"], 16) == 0
    # The workspace's own processes: no capabilities, and no setuid way back to them.
    a_status = Path(f"/proc/{a.backend_state['pid']}/status").read_text()
    assert "NoNewPrivs:\t1" in a_status
    assert "CapEff:\t0000000000000000" in a_status
    tcp = inside["tcp"]
    assert tcp["127.0.0.1:5432"].startswith("refused"), tcp
    assert tcp[f"127.0.0.1:{redis_port}"].startswith("refused"), tcp
    assert tcp[f"::1:{redis_port}"].startswith("refused"), tcp
    assert tcp[f"127.0.0.1:{b_port}"].startswith("refused"), tcp
    assert tcp[f"127.0.0.1:{registry_port()}"] == "connected", tcp
    # PostgreSQL's trust socket is hidden; the engine's is the docker group's, which A is not in.
    assert all(v.startswith("refused") for v in inside["unix"].values()), inside["unix"]
    assert all(v.startswith("refused") for v in inside["read"].values()), inside["read"]
    assert all(v.startswith("refused") for v in inside["list"].values()), inside["list"]
    assert inside["kill"][str(b_pid)].startswith("refused"), inside["kill"]
    assert SECRET not in json.dumps(inside)


def test_stop_kills_what_a_workspace_daemonized_and_removal_frees_its_uid(
    api, isolation_worker, instances
) -> None:
    workspace = create_online(api, "daemon", "shell-default", {}, timeout=60)
    uid = workspace.isolation_uid
    assert uid is not None
    # Something of A's own, in a session of its own: outside the process group stop signals.
    escaped = subprocess.Popen(
        [
            "nsenter",
            f"--target={workspace.backend_state['pid']}",
            "--mount",
            "--",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "setsid",
            settings.WORKSPACE_PYTHON,
            "-c",
            "import time; time.sleep(600)",
        ],
        start_new_session=True,
    )
    try:
        response = api.delete(f"/api/workspaces/{workspace.id}/")
        assert response.status_code == 202, response.content

        def removed() -> bool:
            workspace.refresh_from_db()
            return workspace.status == S.REMOVED

        wait_for(removed, timeout=60, message="removed")
        escaped.wait(timeout=10)
        from provisioning.backends.process import _uid_processes

        assert _uid_processes(uid) == []
        # The uid is free again: the next workspace gets it.
        again = create_online(api, "daemon2", "shell-default", {}, timeout=60)
        assert again.isolation_uid == uid
    finally:
        if escaped.poll() is None:
            escaped.kill()


def test_a_row_without_a_uid_gets_one_when_its_cycle_launches(
    api, isolation_worker, instances
) -> None:
    """A process workspace made while isolation was off has no uid; the cycle that launches it
    gives it one (the cycle otherwise takes the uid it read with the row it locked)."""
    workspace = create_online(api, "uidless", "shell-default", {}, timeout=60)
    Workspace.objects.filter(id=workspace.id).update(isolation_uid=None)
    generation = workspace.generation
    assert api.post(f"/api/workspaces/{workspace.id}/restart/").status_code == 202

    def restarted() -> Workspace | None:
        row = Workspace.objects.get(id=workspace.id)
        assert row.status != S.FAILED, row.last_error
        return row if row.status == S.ONLINE and row.generation > generation else None

    row = wait_for(restarted, timeout=60, message="restarted")
    assert row.isolation_uid is not None
    assert row.backend_state["uid"] == row.isolation_uid
    status = Path(f"/proc/{row.backend_state['pid']}/status").read_text()
    assert f"Uid:\t{row.isolation_uid}\t" in status
