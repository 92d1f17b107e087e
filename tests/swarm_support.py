"""Private Docker engines joined into a swarm, for the Swarm backend's tests of record.

Each engine runs with CI's flags (no iptables, no default bridge) under its own folder. Swarm
mode needs a ``docker_gwbridge``: it is created first, under a bridge name of its own and a /28
in 172.31.250.0/24 that no route on this host uses yet, so engines of other sessions are never
disturbed. Each node advertises on its own loopback address (127.0.0.N, the first whose gossip
port 7946 is free), since the swarm's ports are bound there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

DOCKERD_FLAGS = (
    "--storage-driver=overlay2",
    "--iptables=false",
    "--ip-masq=false",
    "--bridge=none",
    "--ip-forward=false",
)
GWBRIDGE_POOL = ipaddress.ip_network("172.31.250.0/24")


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def free_loopback(taken: set[str]) -> str:
    for last in range(3, 250):
        address = f"127.0.0.{last}"
        if address not in taken and _port_free(address, 7946) and _port_free(address, 2377):
            return address
    raise RuntimeError("no loopback address with the swarm ports free")


def free_udp_port() -> int:
    for port in range(47000, 49000):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free UDP port for the swarm's data path")


def free_subnet() -> str:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(line.split()[0], strict=False))
    for subnet in GWBRIDGE_POOL.subnets(new_prefix=28):
        if not any(subnet.overlaps(other) for other in used):
            return str(subnet)
    raise RuntimeError(f"no free /28 left in {GWBRIDGE_POOL}")


class Engine:
    """One private dockerd, started and stopped by its pid."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.directory = Path(tempfile.mkdtemp(prefix="swarm-dockerd-"))
        self.host = f"unix://{self.directory}/docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.bridge = f"gw{uuid.uuid4().hex[:10]}"

    def docker(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["docker", "-H", self.host, *args], capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def start(self) -> Engine:
        log = open(self.directory / "dockerd.log", "ab")  # noqa: SIM115 - lives with the engine
        self.proc = subprocess.Popen(
            [
                "dockerd",
                *DOCKERD_FLAGS,
                "-H",
                self.host,
                "--data-root",
                str(self.directory / "data"),
                "--exec-root",
                str(self.directory / "exec"),
                "--pidfile",
                str(self.directory / "dockerd.pid"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while self.docker("version", check=False) == "" or not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start: see {self.directory}/dockerd.log")
            time.sleep(0.2)
        # Before swarm mode: the gateway bridge under a name and a small subnet of our own.
        self.docker(
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            free_subnet(),
            "-o",
            f"com.docker.network.bridge.name={self.bridge}",
            "-o",
            "com.docker.network.bridge.enable_icc=false",
            "-o",
            "com.docker.network.bridge.enable_ip_masquerade=false",
            "docker_gwbridge",
        )
        return self

    def _answers(self) -> bool:
        return (
            subprocess.run(
                ["docker", "-H", self.host, "info"], capture_output=True, timeout=30
            ).returncode
            == 0
        )

    def init_swarm(self) -> str:
        """Make this engine a manager; returns the worker join token."""
        self.docker(
            "swarm",
            "init",
            "--advertise-addr",
            self.address,
            "--listen-addr",
            f"{self.address}:2377",
            "--default-addr-pool",
            "10.216.0.0/16",
            # The VXLAN port is bound on every address: one of its own per swarm on this host.
            "--data-path-port",
            str(free_udp_port()),
        )
        return self.docker("swarm", "join-token", "-q", "worker")

    def join(self, manager: Engine, token: str) -> None:
        self.docker(
            "swarm",
            "join",
            "--token",
            token,
            "--advertise-addr",
            self.address,
            "--listen-addr",
            f"{self.address}:2377",
            f"{manager.address}:2377",
        )

    def node_id(self) -> str:
        return self.docker("info", "--format", "{{.Swarm.NodeID}}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
        # dockerd leaves its network namespaces bind-mounted under the exec root.
        mounts = Path("/proc/mounts").read_text().splitlines()
        points = sorted(
            (line.split()[1] for line in mounts if line.split()[1].startswith(str(self.directory))),
            reverse=True,
        )
        for point in points:
            subprocess.run(["umount", point], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)
