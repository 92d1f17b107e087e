"""Workspace isolation on the process backend, tried as an attacker would: real workspaces made
through the API and run by a real worker, each as its own uid; the probe runs inside workspace A
(A's uid and gid, no groups, A's mount namespace) and tries to reach what it must not."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends.process_firewall import registry_port
from provisioning.backends.process_network import link
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


# Addresses given to an interface of the test's own when the host has no address but loopback's:
# the firewall's subject is every local address, and a host with only loopback would prove
# nothing about the others. Documentation ranges (RFC 5737, RFC 3849), routed nowhere.
PROBE_INTERFACE = f"wsp{os.getpid() % 100000}"
PROBE_ADDRESSES = ("198.51.100.77/32", "2001:db8:77::1/128")


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10, check=False)


def _host_addresses() -> list[tuple[str, str]]:
    """Every local address of the host, as ``(address, interface)``: each interface's IPv4 and
    IPv6 addresses, read from ``ip -j addr`` now (link-local ones need their interface)."""
    listed = _ip("-j", "addr")
    assert listed.returncode == 0, listed.stderr
    found = []
    for interface in json.loads(listed.stdout):
        for address in interface.get("addr_info", []):
            if address.get("family") in ("inet", "inet6") and not address.get("tentative"):
                found.append((str(address["local"]), str(interface["ifname"])))
    return found


def _add_probe_interface() -> None:
    """A dummy interface, or a veth pair where the kernel has no dummy driver, with an IPv4
    and an IPv6 address (deleting it deletes its peer)."""
    if _ip("link", "add", PROBE_INTERFACE, "type", "dummy").returncode != 0:
        peer = f"{PROBE_INTERFACE}p"
        made = _ip("link", "add", PROBE_INTERFACE, "type", "veth", "peer", "name", peer)
        assert made.returncode == 0, made.stderr
    for address in PROBE_ADDRESSES:
        dad = ["nodad"] if ":" in address else []
        added = _ip("addr", "add", address, "dev", PROBE_INTERFACE, *dad)
        assert added.returncode == 0, added.stderr
    assert _ip("link", "set", PROBE_INTERFACE, "up").returncode == 0


@pytest.fixture(scope="module")
def host_addresses() -> Iterator[list[tuple[str, str]]]:
    """The host's local addresses; an interface of the test's own with an IPv4 and an IPv6
    address is added for the module (and removed after it) when loopback's are all there is."""
    found = _host_addresses()
    created = all(name == "lo" for _, name in found)
    try:
        if created:
            _add_probe_interface()
            found = _host_addresses()
        assert any(name != "lo" for _, name in found), found
        assert {"127.0.0.1", "::1"} <= {address for address, _ in found}, found
        yield found
    finally:
        if created:
            _ip("link", "del", PROBE_INTERFACE)


def _target(address: str, interface: str) -> str:
    """How the probe names an address: a link-local IPv6 one with its interface (scope)."""
    return f"{address}%{interface}" if address.lower().startswith("fe80:") else address


def _listen_on(stack: ExitStack, host: str) -> int:
    """A TCP listener of the test's own on ``host`` (closed with ``stack``); its port."""
    [(family, kind, _, _, address)] = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )
    listener = stack.enter_context(socket.socket(family, kind))
    listener.bind(address)
    listener.listen(16)
    return int(listener.getsockname()[1])


def _listening(workspace: Workspace, port: int) -> bool:
    """Whether something listens on ``port`` in the workspace's network namespace."""
    out = subprocess.run(
        [
            "nsenter",
            f"--target={workspace.backend_state['pid']}",
            "--net",
            "--",
            "ss",
            "-Hltn",
            f"sport = :{port}",
        ],
        capture_output=True,
        text=True,
    )
    return bool(out.stdout.strip())


def gateway(workspace: Workspace) -> str:
    """The host's end of the workspace's link: where it reaches the registry."""
    return str(link(workspace.isolation_uid or 0).gateway)


def _probe_as(workspace: Workspace | None, targets: dict[str, Any]) -> dict[str, Any]:
    """Run the probe inside ``workspace`` (its uid, gid, no groups, its mount and network
    namespaces), or as the platform itself when None (the control: the same probe does reach
    those targets)."""
    argv = [settings.WORKSPACE_PYTHON, str(PROBE), json.dumps(targets)]
    if workspace is not None:
        pid = workspace.backend_state["pid"]
        uid = workspace.isolation_uid
        argv = [
            "nsenter",
            f"--target={pid}",
            "--mount",
            "--net",
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
    api, isolation_worker, instances, host_addresses
) -> None:
    assert settings.WORKSPACE_PROCESS_ISOLATION == "uid"
    b_port = free_port()
    b_env = {"APP_PORT": str(b_port), "B_SECRET": SECRET}
    b = create_online(api, "b", "shell-listener", b_env, timeout=60)
    a = create_online(api, "a", "shell-default", {}, timeout=60)
    # A's agent registered (it is online) through the one port it may reach.
    assert a.isolation_uid is not None and b.isolation_uid is not None
    assert a.isolation_uid != b.isolation_uid
    wait_for(lambda: _listening(b, b_port), timeout=30, message="B's app listening")

    b_dir = Path(settings.WORKSPACE_DATA_DIR) / str(b.id)
    (b_dir / "configs" / "secret.txt").write_text(SECRET)
    for folder in ("configs", "home"):
        info = (b_dir / folder).stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (b.isolation_uid, 0o700)
    redis_port = int(settings.REDIS_URL.split(":")[-1].split("/")[0])
    # A listener of the test's own on every local address of the host (every interface's IPv4
    # and IPv6 addresses, loopback's too): the firewall must refuse the workspace's uid each.
    # Read again now: the module's fixture made sure of an address beyond loopback's, and other
    # work on the host may have added interfaces since.
    addresses = _host_addresses()
    own: dict[str, int] = {}
    with ExitStack() as listeners:
        for address, interface in addresses:
            host = _target(address, interface)
            try:
                own[host] = _listen_on(listeners, host)
            except OSError:
                # Other work on the host adds and removes interfaces (a container's veth): an
                # address gone since it was listed has nothing left to probe.
                if (address, interface) in _host_addresses():
                    raise
        beyond_loopback = {host for host in own if host not in ("127.0.0.1", "::1")}
        assert {":" in host for host in beyond_loopback} == {True, False}, addresses
        assert a.app_port not in own.values() and registry_port() not in own.values()
        own_tcp = [[host, port] for host, port in own.items()]
        _probe_the_boundary(a, b, b_port, redis_port, own_tcp)


def _probe_the_boundary(
    a: Workspace, b: Workspace, b_port: int, redis_port: int, own_tcp: list[list[Any]]
) -> None:
    b_pid = b.backend_state["pid"]
    b_dir = Path(settings.WORKSPACE_DATA_DIR) / str(b.id)
    b_address = b.backend_state["address"]
    engine = settings.DOCKER_HOST
    engine_socket = [engine.removeprefix("unix://")] if engine.startswith("unix://") else []
    targets = {
        "tcp": [
            ["127.0.0.1", 5432],
            ["127.0.0.1", redis_port],
            ["::1", redis_port],
            ["127.0.0.1", b_port],
            [b_address, b_port],
            ["127.0.0.1", registry_port()],
            [gateway(a), registry_port()],
            *own_tcp,
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
    # Redis listens on both loopback addresses; each of the test's listeners answers the host.
    assert control["tcp"][f"127.0.0.1:{redis_port}"] == "connected"
    assert control["tcp"][f"::1:{redis_port}"] == "connected"
    for host, port in own_tcp:
        assert control["tcp"][f"{host}:{port}"] == "connected", (host, control["tcp"])
    assert control["tcp"][f"{b_address}:{b_port}"] == "connected"  # where the proxy reaches it
    assert control["tcp"][f"{gateway(a)}:{registry_port()}"] == "connected"
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
    assert tcp[f"{b_address}:{b_port}"].startswith("refused"), tcp
    # The registry, at the host's end of A's link (its loopback is its own).
    assert tcp[f"{gateway(a)}:{registry_port()}"] == "connected", tcp
    assert tcp[f"127.0.0.1:{registry_port()}"].startswith("refused"), tcp
    for host, port in own_tcp:
        assert tcp[f"{host}:{port}"].startswith("refused"), (host, tcp)
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
            "--net",
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
        from provisioning.backends.process_launch import uid_processes

        assert uid_processes(uid) == []
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
