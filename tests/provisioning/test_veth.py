"""The veth links of DOCKER_NETWORK_MODE=veth, made on this host's kernel for real containers of
the real engine: the addresses a slot picks, what the wiring refuses, a leftover host end
replaced, the link deleted."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends import veth
from provisioning.backends.base import BackendError, BackendUnavailable, LaunchSpec
from provisioning.backends.docker import DockerBackend
from tests.support import wait_for
from workspaces.manifests import templates


def test_a_slot_picks_its_own_31() -> None:
    assert veth.pair("10.213.0.0/16", 0) == veth.Pair("10.213.0.0", "10.213.0.1")
    assert veth.pair("10.213.0.0/16", 1) == veth.Pair("10.213.0.2", "10.213.0.3")
    assert veth.pair("10.213.0.0/16", 200) == veth.Pair("10.213.1.144", "10.213.1.145")
    assert veth.pair("10.213.0.0/16", 32767) == veth.Pair("10.213.255.254", "10.213.255.255")
    for slot in (-1, 32768):
        with pytest.raises(veth.VethError, match="has no /31"):
            veth.pair("10.213.0.0/16", slot)


def _listener(engine: Any, **network: Any) -> Any:
    """A running container (networking as given) whose port 8080 answers "hi"."""
    return engine.containers.run(
        settings.DOCKER_AGENT_IMAGE,
        entrypoint=["sh", "-c", "while true; do echo hi | nc -l -p 8080; done"],
        labels={f"{settings.DOCKER_LABEL_PREFIX}.platform": settings.PLATFORM_ID},
        detach=True,
        **network,
    )


@pytest.fixture
def host_end() -> Iterator[str]:
    name = f"{settings.DOCKER_BRIDGE_PREFIX}t{uuid.uuid4().hex[:8]}"
    yield name
    veth.unwire(name)


def _answer(address: str) -> bytes:
    with socket.create_connection((address, 8080), timeout=3) as connection:
        return connection.recv(16)


def _pid(container: Any) -> int:
    container.reload()
    return int(container.attrs["State"]["Pid"])


@pytest.mark.docker
def test_a_container_gets_its_link_and_a_leftover_host_end_is_replaced(
    docker_engine: Any, host_end: str
) -> None:
    container = _listener(docker_engine, network_disabled=True, network_mode="none")
    try:
        link = veth.pair("10.213.0.0/16", 901)
        veth.wire(_pid(container), str(container.id), host_end, link)
        wait_for(lambda: _answer(link.address) == b"hi\n", timeout=10, message="the app")
        addresses = Path("/proc/net/fib_trie").read_text()
        assert link.gateway in addresses
        assert (Path("/sys/class/net") / host_end / "operstate").read_text().strip() == "up"
        # The host end carries no IPv6 address for the container to reach.
        assert Path(f"/proc/sys/net/ipv6/conf/{host_end}/disable_ipv6").read_text().strip() == "1"
        # Wired again (a host end of that name already there): replaced, still answering.
        index = Path(f"/sys/class/net/{host_end}/ifindex").read_text()
        veth.wire(_pid(container), str(container.id), host_end, link)
        assert Path(f"/sys/class/net/{host_end}/ifindex").read_text() != index
        wait_for(lambda: _answer(link.address) == b"hi\n", timeout=10, message="the app")
        veth.unwire(host_end)
        assert not Path("/sys/class/net", host_end).exists()
        veth.unwire(host_end)  # gone means done
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_the_wiring_refuses_the_hosts_namespace_and_a_process_not_the_containers(
    docker_engine: Any, host_end: str
) -> None:
    link = veth.pair("10.213.0.0/16", 902)
    on_host = _listener(docker_engine, network_mode="host")
    try:
        with pytest.raises(veth.VethError, match="shares the host's network namespace"):
            veth.wire(_pid(on_host), str(on_host.id), host_end, link)
        # This test's own process is not that container's (as a pid of a remote engine's
        # container would not be).
        with pytest.raises(veth.VethError, match="is not container"):
            veth.wire(os.getpid(), str(on_host.id), host_end, link)
        # Past pid_max (2**22): no such process.
        with pytest.raises(veth.VethError, match="is gone"):
            veth.wire(2**22 + 1, str(on_host.id), host_end, link)
    finally:
        on_host.remove(force=True)
    assert not Path("/sys/class/net", host_end).exists()


@pytest.mark.docker
def test_the_backend_refuses_a_workspace_without_a_uid(docker_engine: Any, settings: Any) -> None:
    settings.DOCKER_NETWORK_MODE = "veth"
    template = templates().get("shell-default")
    assert template is not None
    workspace_id = uuid.uuid4()
    env = {"WORKSPACE_ID": str(workspace_id), "PLATFORM_URL": "http://127.0.0.1:9"}
    backend = DockerBackend()
    with pytest.raises(BackendError, match="WORKSPACE_UID_RANGE"):
        backend.prepare(LaunchSpec(workspace_id, 1, template, env), {})
    assert backend.status(workspace_id, {}).exists is False


def test_a_worker_that_is_not_root_is_refused_at_once(monkeypatch: Any, settings: Any) -> None:
    settings.DOCKER_NETWORK_MODE = "veth"
    settings.WORKSPACE_BACKEND = "docker"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(veth.VethError, match="needs root"):
        veth.check()
    with pytest.raises(BackendUnavailable, match="DOCKER_NETWORK_MODE=veth"):
        DockerBackend().check_available()
    from provisioning.checks import check_docker_wiring

    [error] = check_docker_wiring()
    assert error.id == "provisioning.E003" and "needs root" in error.msg
    # The other modes need no root of the worker.
    settings.DOCKER_NETWORK_MODE = "workspace"
    assert check_docker_wiring() == []
