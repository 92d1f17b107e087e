"""Warm pools: a create served by a pool's member against the same create started cold, side by
side in one run, on the process backend and on Docker; and what a pool costs at rest.

Platform: gunicorn (API and registry) and one Celery worker with beat, as ``bench.stack`` starts
them, on the backend measured, with a templates folder of two templates that differ only in their
pool: ``warm`` (``pool: {size: 50}``) and ``cold`` (no pool). Both run the platform's agent
serving its page on an allocated port: *online* means the app answers (the agent registers only
once its health path does).

Per round (3 rounds, the order of warm and cold flipping each round):

* **one**: ``ONE_SAMPLES`` single creates, each ``POST /api/workspaces/`` sent to its
  ``WORKSPACE_ONLINE`` event (the agent's registration, after its app answered); warm waits for
  a full pool before each sample.
* **fifty**: 50 creates sent together by 50 threads; the first POST to the last ``online``. Warm
  starts from a full pool of 50.

Every workspace is removed after its sample. Then **at rest**: with 50 members ready and nothing
else happening, the CPU the members use over ``REST_SECONDS`` (per member, as a share of one core)
and their memory (per member: the agent's resident set on the process backend, the container's
memory use on Docker).

On a machine shared with other platforms, give the run a ``WORKSPACE_APP_PORTS`` range of its own
below the kernel's ephemeral ports (``/proc/sys/net/ipv4/ip_local_port_range``): a port in use
elsewhere fails an app's start, pool or not.

    .venv/bin/python -m bench.pools [process|docker ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Figure, percentile, print_figures, setup_django
from bench.stack import Platform, platform, ready_pool_members, remove_labelled, wait_until

POOL = 50
ROUNDS = 3
ONE_SAMPLES = 5
REST_SECONDS = 10.0
# Docker: the resident size of the engine's shim per member container (outside its cgroup).
SHIM_MIB = 0.0
TIMEOUT = 300.0
MANIFEST = """runtime: shell
image: workspace-agent:dev
app:
  port: auto
  health_path: /
{pool}"""


def _templates(directory: Path) -> Path:
    for name, pool in (("warm", f"pool:\n  size: {POOL}\n"), ("cold", "")):
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "config.yaml").write_text(MANIFEST.format(pool=pool))
    return directory


def _wait_full() -> None:
    from django.conf import settings

    def full() -> bool:
        return ready_pool_members("warm", settings.WORKSPACE_BACKEND) >= POOL

    wait_until(full, TIMEOUT, f"{POOL} ready members", interval=0.2)


def _online_at(ids: list[str]) -> dict[str, float]:
    from workspaces.models import Workspace, WorkspaceEvent
    from workspaces.status import EventType, WorkspaceStatus

    def all_online() -> bool:
        rows = Workspace.objects.filter(id__in=ids).values_list("status", "last_error")
        failed = [error for status, error in rows if status == WorkspaceStatus.FAILED]
        if failed:
            raise RuntimeError(f"{len(failed)} workspaces failed: {failed[0]}")
        return sum(status == WorkspaceStatus.ONLINE for status, _ in rows) == len(ids)

    wait_until(all_online, TIMEOUT, f"{len(ids)} workspaces online", interval=0.01)
    events = WorkspaceEvent.objects.filter(workspace_id__in=ids, type=EventType.ONLINE)
    return {str(e.workspace_id): e.created_at.timestamp() for e in events.order_by("-id")}


def _remove(stack: Platform, ids: list[str]) -> None:
    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    for workspace_id in ids:
        stack.request("DELETE", f"/api/workspaces/{workspace_id}/")
    wait_until(
        lambda: (
            not Workspace.objects.filter(id__in=ids)
            .exclude(status=WorkspaceStatus.REMOVED)
            .exists()
        ),
        TIMEOUT,
        "workspaces removed",
        interval=0.1,
    )


def one(stack: Platform, template: str) -> list[float]:
    latencies = []
    for _ in range(ONE_SAMPLES):
        if template == "warm":
            _wait_full()
        sent = time.time()
        workspace_id = stack.create_workspace(f"o{uuid.uuid4().hex[:10]}", template)
        latencies.append(_online_at([workspace_id])[workspace_id] - sent)
        _remove(stack, [workspace_id])
    return latencies


def fifty(stack: Platform, template: str) -> float:
    if template == "warm":
        _wait_full()
    barrier = threading.Barrier(POOL)
    tag = uuid.uuid4().hex[:8]

    def create(index: int) -> tuple[str, float]:
        barrier.wait()
        sent = time.time()
        return stack.create_workspace(f"f{tag}-{index}", template), sent

    with ThreadPoolExecutor(max_workers=POOL) as threads:
        created = dict(threads.map(create, range(POOL)))
    online = _online_at(list(created))
    total = max(online.values()) - min(created.values())
    _remove(stack, list(created))
    return total


def _member_rows() -> list[Any]:
    from workspaces.services import pools

    return list(pools.members().filter(pool="warm").values_list("id", "backend_state"))


def _retire_members() -> None:
    """Members are nobody's: no API call removes them; the service does, as the sweep would."""
    from workspaces import services
    from workspaces.status import WorkspaceStatus

    ids = [row[0] for row in _member_rows()]
    for workspace_id in ids:
        services.request_remove(workspace_id)
    from workspaces.models import Workspace

    wait_until(
        lambda: (
            not Workspace.objects.filter(id__in=ids)
            .exclude(status=WorkspaceStatus.REMOVED)
            .exists()
        ),
        TIMEOUT,
        "members removed",
        interval=0.2,
    )


def at_rest(backend: str) -> tuple[float, float]:
    """(CPU share of one core, MiB) per ready member, over REST_SECONDS."""
    _wait_full()
    rows = _member_rows()
    if backend == "process":
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            total = 0
            for _, state in rows:
                with open(f"/proc/{state['pid']}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            return total / ticks

        def memory() -> float:
            total = 0
            for _, state in rows:
                with open(f"/proc/{state['pid']}/status") as handle:
                    for line in handle:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            return total

        before = cpu()
        time.sleep(REST_SECONDS)
        used = cpu() - before
        return used / REST_SECONDS / len(rows), memory() / len(rows) / 2**20
    ids = [str(state["container_id"]) for _, state in rows]

    def cgroup(container_id: str, names: tuple[str, ...]) -> int:
        """A container's cgroup counter (v1 under cpuacct/ and memory/, or v2)."""
        for name in names:
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                for folder in (
                    f"docker/{container_id}",
                    f"system.slice/docker-{container_id}.scope",
                ):
                    path = Path(root) / name.split(":")[0] / folder / name.split(":")[1]
                    if path.is_file():
                        text = path.read_text()
                        if name.endswith("cpu.stat"):
                            usage = text.split("usage_usec")[1].split()[0]
                            return int(usage) * 1000
                        return int(text.split()[0])
        raise RuntimeError(f"no cgroup counters for container {container_id}")

    cpu_names = ("cpuacct:cpuacct.usage", ":cpu.stat")
    memory_names = ("memory:memory.usage_in_bytes", ":memory.current")
    before = sum(cgroup(container_id, cpu_names) for container_id in ids)
    time.sleep(REST_SECONDS)
    used = (sum(cgroup(container_id, cpu_names) for container_id in ids) - before) / 1e9
    memory = sum(cgroup(container_id, memory_names) for container_id in ids)
    # Each container also has the engine's shim (containerd-shim-runc-v2), outside its cgroup.
    shims = 0
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes()
            if b"containerd-shim" in command and any(i.encode() in command for i in ids):
                status = (proc / "status").read_text()
                shims += int(status.split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    global SHIM_MIB
    SHIM_MIB = shims / len(ids) / 2**20
    return used / REST_SECONDS / len(ids), memory / len(ids) / 2**20


def run_backend(backend: str, log_root: Path, rounds: int = ROUNDS) -> list[Figure]:
    directory = _templates(Path(tempfile.mkdtemp(prefix="bench-pools-")) / "templates")
    os.environ["WORKSPACE_TEMPLATES_DIR"] = str(directory)
    from django.conf import settings

    settings.WORKSPACE_TEMPLATES_DIR = directory
    settings.WORKSPACE_BACKEND = backend
    singles: dict[str, list[float]] = {"warm": [], "cold": []}
    bursts: dict[str, list[float]] = {"warm": [], "cold": []}
    # The pool's size would otherwise refill it while the retirement at the end removes it.
    extra = {"WORKSPACE_TEMPLATES_DIR": str(directory), "POOL_SWEEP_INTERVAL_SECONDS": "2"}
    if backend == "docker":
        from provisioning.backends.agent_image import build_agent_image

        build_agent_image()
    with platform(f"pools-{backend}", log_root / backend, backend, extra, beat=True) as stack:
        try:
            for index in range(rounds):
                order = ("warm", "cold") if index % 2 == 0 else ("cold", "warm")
                for template in order:
                    singles[template] += one(stack, template)
                    bursts[template].append(fifty(stack, template))
                    print(
                        f"{backend} round {index + 1} {template}: one p50 "
                        f"{percentile(singles[template], 0.5) * 1000:.0f} ms, fifty "
                        f"{bursts[template][-1]:.2f} s",
                        file=sys.stderr,
                    )
            cpu_share, mib = at_rest(backend)
        finally:
            # The pool is switched off first (the platform reloads a changed manifest), so the
            # sweeps retire its members instead of refilling it.
            (directory / "warm" / "config.yaml").write_text(MANIFEST.format(pool=""))
            _retire_members()
            wait_until(lambda: not _member_rows(), TIMEOUT, "the pool emptied", interval=0.5)
            stack_settings_reset(stack)
    what = "the agent process" if backend == "process" else "the container's cgroup"
    rest = (
        f"At rest, per ready member: {cpu_share * 100:.3f} % of one core, {mib:.1f} MiB "
        f"({what}), over {REST_SECONDS:g} s with {POOL} members."
    )
    if backend == "docker":
        rest += f" The engine's shim adds {SHIM_MIB:.1f} MiB resident per container."
    return [
        Figure(
            f"pools/{backend}: one create -> online, from a pool",
            "s",
            singles["warm"],
            floor_name="started cold",
            floor_samples=singles["cold"],
            notes=rest,
            extra={"one_p50_warm": percentile(singles["warm"], 0.5)},
        ),
        Figure(
            f"pools/{backend}: 50 creates at once -> all online, from a pool of 50",
            "s",
            bursts["warm"],
            floor_name="started cold",
            floor_samples=bursts["cold"],
            extra={"rest_cpu_share": cpu_share, "rest_mib": mib},
        ),
    ]


def stack_settings_reset(stack: Platform) -> None:
    """Whatever the platform's Docker workspaces left on the engine goes (its own label only)."""
    if os.environ.get("DOCKER_HOST"):
        remove_labelled(stack.label)


def run(repeats: int = ROUNDS, backends: tuple[str, ...] = ("process", "docker")) -> list[Figure]:
    """``repeats``: rounds per backend (``python -m bench`` passes its ``--repeats``)."""
    setup_django("workspaces_bench_pools")
    log_root = Path(tempfile.mkdtemp(prefix="bench-pools-logs-"))
    figures: list[Figure] = []
    for backend in backends:
        figures += run_backend(backend, log_root, repeats)
    return figures


if __name__ == "__main__":
    chosen = tuple(sys.argv[1:]) or ("process", "docker")
    print_figures(run(ROUNDS, chosen))
