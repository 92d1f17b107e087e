"""Workspace isolation on the Docker backend, tried from inside a real container made through the
API by a real worker on a real engine: each workspace has a link of its own (DOCKER_NETWORK_MODE
veth, the default) or an internal network of its own (workspace), runs as a non-root user with no
capabilities, and reaches only the registry listener; the same under runc and under gVisor."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends import docker_networks as docker_backend
from provisioning.backends.base import BackendError
from provisioning.backends.docker import DockerBackend
from provisioning.backends.docker_firewall import bridge_chain, bridge_ports, bridge_rules
from tests.conftest import require_gvisor
from tests.isolation import create_online
from tests.support import RegistryListener, docker_containers, wait_for, wait_settled
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("use_session_templates"),
]
S = WorkspaceStatus
SECRET = "b-docker-secret-7d2a"
APP_PORT = 8080


def _connect_from(container: Any, host: str, port: int) -> str:
    """Open a TCP connection from inside the container (busybox nc): "connected" or why not."""
    result = container.exec_run(
        ["sh", "-c", f"nc -w 2 {host} {port} </dev/null >/dev/null; echo rc=$?"], demux=True
    )
    out = (result.output[0] or b"").decode()
    err = (result.output[1] or b"").decode()
    return "connected" if "rc=0" in out else f"refused: {err.strip() or out.strip()}"


def _host_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


@pytest.fixture
def host_service() -> Iterator[int]:
    """A TCP service on every host address (as PostgreSQL or sshd often are), accepting and
    closing connections; its port."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.5)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                continue
            client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    server.close()


def _iptables(tool: str, *args: str) -> str:
    return subprocess.run([tool, "-w", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(params=["veth", "workspace"])
def network_mode(request: Any) -> str:
    """Each mode with its own worker (they differ in DOCKER_NETWORK_MODE)."""
    request.getfixturevalue("on_docker" if request.param == "veth" else "on_docker_networks")
    return str(request.param)


# sandbox -> (A's template, B's template): the same workspaces under each runtime.
TEMPLATES = {
    "runc": ("shell-default", "docker-listener"),
    "gvisor": ("shell-gvisor", "docker-listener-gvisor"),
}


@pytest.fixture(params=sorted(TEMPLATES))
def sandbox(request: Any, docker_engine: Any) -> str:
    """Each sandbox, in each network mode; gVisor needs the engine's runtime."""
    if request.param == "gvisor":
        require_gvisor(docker_engine)
    return str(request.param)


def test_a_container_reaches_only_the_registry(
    api,
    network_mode: str,
    sandbox: str,
    docker_engine,
    registry_listener: RegistryListener,
    host_service: int,
) -> None:
    a_template, b_template = TEMPLATES[sandbox]
    # Settled, not only online: an agent may register before its cycle has recorded the
    # container's network and address.
    b = wait_settled(
        create_online(api, "b", b_template, {"B_SECRET": SECRET}, timeout=90).id, S.ONLINE
    )
    # A's agent registered: A is online.
    a = wait_settled(create_online(api, "a", a_template, {}, timeout=90).id, S.ONLINE)
    [a_container] = docker_containers(docker_engine, str(a.id))
    [b_container] = docker_containers(docker_engine, str(b.id))
    assert a.sandbox == b.sandbox == sandbox
    # The kernel A talks to: gVisor's own (its release is always 4.4.0), or the host's.
    release = a_container.exec_run(["uname", "-r"]).output.decode().strip()
    assert (release == "4.4.0") == (sandbox == "gvisor"), release
    b_address = b.backend_state["address"]
    assert a.backend_state["network"] != b.backend_state["network"]
    if network_mode == "veth":
        # No network of the engine's: the worker's link, a /31 numbered by A's isolation uid.
        assert a_container.attrs["HostConfig"]["NetworkMode"] == "none"
        assert a.isolation_uid is not None and b.isolation_uid is not None
        offset = a.isolation_uid - settings.WORKSPACE_UID_RANGE[0]
        subnet = ipaddress.IPv4Network(settings.DOCKER_VETH_SUBNET)
        gateway = str(subnet.network_address + 2 * offset)
        assert a.backend_state["address"] == str(subnet.network_address + 2 * offset + 1)
        bridge = a.backend_state["network"]
    else:
        a_network = docker_engine.networks.get(a.backend_state["network"])
        [a_ipam] = a_network.attrs["IPAM"]["Config"]
        gateway = a_ipam["Gateway"]
        assert a_network.attrs["Internal"] is True
        bridge = a_network.attrs["Options"]["com.docker.network.bridge.name"]
    # The bridge (veth: the link's host end) carries the prefix the host firewall matches, and
    # the firewall is there with the port agents call (the registry listener's).
    assert bridge == DockerBackend.bridge_name(a.id) and Path("/sys/class/net", bridge).exists()
    chain, prefix = settings.WORKSPACE_FIREWALL_CHAIN, settings.DOCKER_BRIDGE_PREFIX
    for tool in ("iptables", "ip6tables"):
        listed = _iptables(tool, "-S", bridge_chain(chain))
        ports = bridge_ports(listed, chain, prefix)
        assert registry_listener.port in ports
        assert listed.splitlines()[1:] == bridge_rules(
            chain, prefix, ports, ipv6=tool == "ip6tables"
        )
        assert f"-A INPUT -j {bridge_chain(chain)}" in _iptables(tool, "-S", "INPUT")

    # Controls: B's app answers the host (that is how the proxy reaches it), and the probe
    # does connect where it is allowed to, so the refusals below are the boundary's doing.
    wait_for(lambda: _host_connect(b_address, APP_PORT), timeout=30, message="B's app")
    assert _host_connect(gateway, host_service)  # the service listens on the gateway address
    assert _connect_from(a_container, gateway, registry_listener.port) == "connected"

    redis_port = int(settings.REDIS_URL.split(":")[-1].split("/")[0])
    for host, port in [
        ("127.0.0.1", 5432),
        ("127.0.0.1", redis_port),
        (gateway, 5432),
        (gateway, redis_port),
        (b_address, APP_PORT),
        (gateway, host_service),  # what listens on every host address is not reachable
    ]:
        assert _connect_from(a_container, host, port).startswith("refused"), (host, port)

    # Not root, no capabilities, no privilege gains; B's env is nowhere in A's view.
    ident = a_container.exec_run(["id", "-u"]).output.decode().strip()
    assert ident == settings.DOCKER_WORKSPACE_USER.split(":")[0]
    status = a_container.exec_run(["cat", "/proc/1/status"]).output.decode()
    caps = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if "Cap" in line}
    assert caps["CapEff"] == caps["CapPrm"] == "0000000000000000"
    assert "no-new-privileges:true" in a_container.attrs["HostConfig"]["SecurityOpt"]
    if sandbox == "runc":  # gVisor's /proc/<pid>/status has no NoNewPrivs line
        assert "NoNewPrivs:\t1" in status
    environs = a_container.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ"]).output
    assert SECRET.encode() not in environs
    assert b"B_SECRET" in b_container.exec_run(["cat", "/proc/1/environ"]).output

    # Removal takes the network (the link) with it.
    assert api.delete(f"/api/workspaces/{b.id}/").status_code == 202
    wait_for(
        lambda: Workspace.objects.get(id=b.id).status == S.REMOVED, timeout=60, message="removed"
    )
    assert docker_engine.networks.list(names=[b.backend_state["network"]]) == []
    assert not Path("/sys/class/net", DockerBackend.bridge_name(b.id)).exists()


@pytest.mark.parametrize(
    ("mode", "bridge", "refused"),
    [
        ("on", "wsbr0000notthere", "needs the engine on this host"),
        ("on", "", "needs the engine on this host"),
        ("auto", "wsbr0000notthere", None),
        ("off", "wsbr0000notthere", None),
    ],
)
def test_a_bridge_the_firewall_cannot_cover_fails_the_launch_when_required(
    settings: Any, caplog: Any, monkeypatch: Any, mode: str, bridge: str, refused: str | None
) -> None:
    settings.DOCKER_HOST_FIREWALL = mode
    monkeypatch.setattr(docker_backend, "_warned", set())  # warned once per process
    network = {"Name": "ws-x-net", "Options": {"com.docker.network.bridge.name": bridge}}
    if refused:
        with pytest.raises(BackendError, match=refused):
            DockerBackend.ensure_bridge_firewall(network, "http://127.0.0.1:8001")
        return
    DockerBackend.ensure_bridge_firewall(network, "http://127.0.0.1:8001")
    warned = "must refuse what they send" in caplog.text
    assert warned == (mode == "auto")
