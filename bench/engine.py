"""A Docker engine for benchmarks: the one in DOCKER_HOST if it answers, else a private dockerd.

The private daemon uses its own socket, data root and exec root under a temporary folder, with no
bridge and no iptables (workspaces use host networking), and is stopped by its pid at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.errors import DockerException


def _answers(host: str) -> bool:
    try:
        client = docker.DockerClient(base_url=host, timeout=5)
        client.ping()
        client.close()
        return True
    except DockerException:
        return False


def _unmount_under(root: Path) -> None:
    """Unmount what the daemon left mounted under its root (its network namespace file stays
    mounted after a clean shutdown), deepest first, so the folder can be removed."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = f"{root}/"
    points = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, check=False)


def ensure_engine() -> str:
    """Return a DOCKER_HOST that answers, starting a private dockerd when needed."""
    host = os.environ.get("DOCKER_HOST", "")
    if host and _answers(host):
        return host
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError("no Docker engine: set DOCKER_HOST or install docker.io (dockerd)")
    root = Path(tempfile.mkdtemp(prefix="bench-dockerd-"))
    socket_path = root / "docker.sock"
    # gVisor's runtime when runsc is installed, registered as .ci/run does (bench.sandbox).
    runsc = shutil.which("runsc")
    runtimes = (
        {"runsc": {"path": runsc, "runtimeArgs": ["--platform=ptrace", "--network=host"]}}
        if runsc
        else {}
    )
    (root / "daemon.json").write_text(json.dumps({"runtimes": runtimes}))
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(
        [
            dockerd,
            "--config-file",
            str(root / "daemon.json"),
            "--storage-driver=overlay2",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--ip-forward=false",
            "-H",
            f"unix://{socket_path}",
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "dockerd.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    host = f"unix://{socket_path}"
    deadline = time.monotonic() + 30
    while not _answers(host):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"dockerd did not start: {(root / 'dockerd.log').read_text()[-2000:]}"
            )
        time.sleep(0.1)
    os.environ["DOCKER_HOST"] = host
    # Children (benchmarks run in their own processes) find the daemon's processes by this path.
    os.environ["BENCH_DOCKERD_ROOT"] = str(root)
    return host


def ensure_agent_image() -> str:
    """The agent image's tag, built on the engine from this checkout's agent every time, so a
    bench never measures an older agent left on the engine (an unchanged build takes about a
    second; needs Django set up)."""
    from django.conf import settings

    from provisioning.backends.agent_image import build_agent_image

    tag = str(settings.DOCKER_AGENT_IMAGE)
    build_agent_image(tag)
    return tag


TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    parent: int
    uid: int  # the real uid
    command: str  # the command line, arguments joined by spaces
    cpu: float  # user + system seconds so far, with reaped children


def processes() -> dict[int, Proc]:
    """Every process on the host now, read from ``/proc`` (one that ends meanwhile is left out)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        uid = int(status.split("\nUid:", 1)[1].split()[0])
        cpu = sum(int(value) for value in fields[11:15]) / TICKS
        found[int(entry.name)] = Proc(int(fields[1]), uid, cmdline.strip(), cpu)
    return found


def cpu_by_root(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree (name -> its root's pid)."""
    snapshot = processes()
    return {
        name: sum(snapshot[pid].cpu for pid in descendants(snapshot, [root]))
        for name, root in roots.items()
    }


def descendants(snapshot: dict[int, Proc], roots: list[int]) -> set[int]:
    """``roots`` that are in ``snapshot`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, proc in snapshot.items():
        children.setdefault(proc.parent, []).append(pid)
    found: set[int] = set()
    stack = [pid for pid in roots if pid in snapshot]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def cpu_seconds(roots: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the private engine's processes (dockerd, containerd, shims and
    what they reaped: runc, the engine's re-execs) when ``ensure_engine`` started it, and by the
    process trees under ``roots`` (say, gunicorn and the Celery worker). Processes that exited and
    were not reaped by one of these are not counted."""
    snapshot = processes()
    engine_root = os.environ.get("BENCH_DOCKERD_ROOT", "")
    return {
        "engine": sum(proc.cpu for proc in snapshot.values() if engine_root in proc.command)
        if engine_root
        else float("nan"),
        "platform": sum(snapshot[pid].cpu for pid in descendants(snapshot, roots)),
    }
