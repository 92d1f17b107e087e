"""Provisioning on Docker: N = 1, 10 and 50 workspaces created at once through the API, beside
the bare engine starting the same N containers, in the same run.

Platform: gunicorn (2 workers x 4 threads) and one Celery worker (prefork, concurrency 4: the
cycle mostly waits on the engine and PostgreSQL, so a few processes per core) on the Docker
backend, against the Docker engine of the run. N threads send ``POST /api/workspaces/`` together
(shell-default: the busybox agent image). Per workspace, latency is the POST being sent to its
``WORKSPACE_ONLINE`` event (the agent's registration); the run's figure is the first POST to the
last ``online``.

Floor: the bare ``docker`` SDK, N threads calling ``containers.run`` together with the same image,
the same agent, host networking, and a ``PLATFORM_URL`` that points at a tiny threaded HTTP server
answering 200 to everything; per container, latency is the ``run`` call to the agent's first
``/register`` call arriving. The floor creates no volume, copies no config, issues no token and
writes no row: that is exactly what the ratio charges to the platform.

Platform and floor alternate (which goes first flips every repeat); every container is removed
between runs. The notes under the table split each workspace's latency into phases (from the
POST, the ``WORKSPACE_PROVISIONING`` event, the row's ``last_started_at`` and the
``WORKSPACE_ONLINE`` event) and give the CPU each side cost per workspace (read from ``/proc``
when the run uses its private dockerd). The latency distribution is plotted in
``provisioning-latency.png``:

![provisioning latency, platform against floor](provisioning-latency.png)

**Where the time goes (N = 50).** On 2 cores the run is CPU-bound: the CDF of the platform is a
straight line (a constant rate of workspaces coming up) and most of a workspace's latency is
waiting for a worker; running more cycles at once (concurrency 8, 16, or two worker processes)
only makes each cycle slower. The CPU per workspace, in the notes, is the cost: the engine spends
more than twice the floor's, and the platform's own processes add a third of that again. A
profile of the worker (every engine request timed, and each engine call's CPU measured alone on an
idle engine) showed the engine cost is the config volume: ``put_archive`` into a created
container costs the engine about 60 ms of CPU (it mounts the container's file systems and
re-executes itself to unpack), mounting the volume adds about 25 ms to ``start``, while create is
about 16 ms and an inspect, ping or volume create under 3 ms each. The platform copies the
template's files into the volume so that a later start can tell an emptied volume and recover it
(invariant 9): the floor has no volume.

What was changed after profiling (the engine requests per first provision went from 14 to 9):
the template files and the ``.provisioned`` marker go in one archive with the marker as its last
entry (one ``put_archive`` instead of two; the engine unpacks in order, so an interrupted copy
still leaves no marker); the first provision writes the config without reading the marker first
(one ``get_archive`` less, about 30 ms of engine CPU); the config calls address the container by
name instead of inspecting it first; the volume is created without looking it up (create is
get-or-create on the engine). Side by side on this machine, with the same bench, the code before
these changes took 6.4 s for N = 50 against a 2.2 s floor (ratio 2.8); see the table for now.

Later (docs/architecture.md, "Docker backend"): the engine fills the config volume from the
template's config image as it creates the container (``DOCKER_CONFIG_DELIVERY=image``, no
``put_archive``), and a first provision makes 3 engine requests on the host's network (create,
start, inspect) and 5 on a network of its own; the platform runs on its default per-workspace
network unless ``DOCKER_NETWORK_MODE=host``.

    .venv/bin/python -m bench.provisioning [repeats]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Figure, percentile, print_figures, setup_django
from bench.engine import cpu_seconds
from bench.stack import BareEndpoint, Platform, platform, remove_labelled, wait_until

SIZES = (1, 10, 50)
PHASES = {
    "platform": {
        "queue": "POST sent -> cycle began (request, enqueue, waiting for a worker)",
        "cycle": "cycle began -> container running (gate, rows, token, volume, config, start)",
        "agent": "container running -> registered (agent boot, register call)",
    },
    "floor": {
        "run": "containers.run() call (create + start)",
        "agent": "run() returned -> first call arrived (agent boot, HTTP call)",
    },
}
TIMEOUT = 300.0
PLOT = "provisioning-latency.png"


@dataclass
class Run:
    total: float
    latencies: list[float] = field(default_factory=list)
    # Per-workspace seconds spent in each phase, in order (see PHASES).
    phases: dict[str, list[float]] = field(default_factory=dict)
    # CPU seconds the run cost the engine and the platform's processes (bench.engine.cpu_seconds).
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 0.95)


def _together(n: int, task: Any) -> list[Any]:
    """Run ``task(index, barrier)`` in n threads released together."""
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda index: task(index, barrier), range(n)))


def platform_run(stack: Platform, n: int) -> Run:
    from workspaces.models import Workspace, WorkspaceEvent
    from workspaces.status import EventType, WorkspaceStatus

    tag = uuid.uuid4().hex[:8]
    cpu_before = cpu_seconds(stack.pids)

    def create(index: int, barrier: threading.Barrier) -> tuple[str, float]:
        barrier.wait()
        sent = time.time()
        return stack.create_workspace(f"p{tag}-{index}"), sent

    created = dict(_together(n, create))
    ids = list(created)

    def all_online() -> bool:
        rows = Workspace.objects.filter(id__in=ids).values_list("status", "last_error")
        failed = [error for status, error in rows if status == WorkspaceStatus.FAILED]
        if failed:
            raise RuntimeError(f"{len(failed)} workspaces failed: {failed[0]}")
        return sum(status == WorkspaceStatus.ONLINE for status, _ in rows) == n

    wait_until(all_online, TIMEOUT, f"{n} workspaces online", interval=0.1)
    cpu_after = cpu_seconds(stack.pids)

    def first_event(kind: str) -> dict[uuid.UUID, float]:
        rows = (
            WorkspaceEvent.objects.filter(workspace_id__in=ids, type=kind)
            # Newest first, so the dict keeps each workspace's first event of the kind.
            .order_by("-created_at")
            .values_list("workspace_id", "created_at")
        )
        return {workspace_id: at.timestamp() for workspace_id, at in rows}

    online, began = first_event(EventType.ONLINE), first_event(EventType.PROVISIONING)
    running = {
        workspace_id: at.timestamp()
        for workspace_id, at in Workspace.objects.filter(id__in=ids).values_list(
            "id", "last_started_at"
        )
    }
    keys = [uuid.UUID(i) for i in ids]
    latencies = [online[key] - created[str(key)] for key in keys]
    phases = {
        "queue": [began[key] - created[str(key)] for key in keys],
        "cycle": [running[key] - began[key] for key in keys],
        # Negative when the agent registered before the cycle recorded the start.
        "agent": [online[key] - running[key] for key in keys],
    }
    cpu = {key: cpu_after[key] - cpu_before[key] for key in cpu_after}
    return Run(max(online.values()) - min(created.values()), latencies, phases, cpu)


def floor_run(client: Any, image: str, endpoint: BareEndpoint, label: str, n: int) -> Run:
    returned: dict[str, float] = {}

    def start(index: int, barrier: threading.Barrier) -> tuple[str, float]:
        workspace_id = str(uuid.uuid4())
        barrier.wait()
        sent = time.time()
        client.containers.run(
            image,
            name=f"floor-{workspace_id}",
            detach=True,
            environment={
                "WORKSPACE_ID": workspace_id,
                "WORKSPACE_TOKEN": "floor",
                "PLATFORM_URL": endpoint.url,
            },
            labels={label.split("=", 1)[0]: label.split("=", 1)[1]},
            network_mode="host",
        )
        returned[workspace_id] = time.time()
        return workspace_id, sent

    cpu_before = cpu_seconds([])
    started = dict(_together(n, start))
    wait_until(
        lambda: all(endpoint.arrived(i) is not None for i in started),
        TIMEOUT,
        f"{n} bare agents calling back",
    )
    cpu_after = cpu_seconds([])
    arrivals = {i: endpoint.arrived(i) or 0.0 for i in started}
    latencies = [arrivals[i] - started[i] for i in started]
    phases = {
        "run": [returned[i] - started[i] for i in started],
        "agent": [arrivals[i] - returned[i] for i in started],
    }
    cpu = {"engine": cpu_after["engine"] - cpu_before["engine"]}
    return Run(max(arrivals.values()) - min(started.values()), latencies, phases, cpu)


def phase_notes(runs: list[Run], side: str) -> str:
    """Median seconds per phase over every workspace of every run, as a sentence."""
    parts = []
    for phase, meaning in PHASES[side].items():
        values = [x for run in runs for x in run.phases.get(phase, [])]
        parts.append(f"{meaning} {statistics.median(values):.2f} s")
    text = f"{side} per-workspace medians: " + ", ".join(parts)
    n = len(runs[0].latencies)
    cpu = {
        key: statistics.median(run.cpu[key] for run in runs) / n * 1000
        for key in runs[0].cpu
        if not math.isnan(runs[0].cpu[key])
    }
    if cpu:
        where = {
            "engine": "the engine (dockerd, containerd, shims)",
            "platform": "gunicorn + Celery",
        }
        text += "; CPU per workspace: " + ", ".join(
            f"{where[key]} {value:.0f} ms" for key, value in cpu.items()
        )
    return text


def _clean_platform(stack: Platform) -> None:
    from workspaces.models import Workspace

    remove_labelled(stack.label)
    Workspace.objects.filter(owner__username=stack.owner).delete()


def plot(samples: dict[tuple[str, int], list[float]], sizes: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for side, colour, label in (
            ("platform", "tab:blue", "platform (POST -> online)"),
            ("floor", "tab:orange", "bare docker SDK (run -> agent's first call)"),
        ):
            values = sorted(samples.get((side, n), []))
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", color=colour, label=label, linewidth=2)
            ax.axvline(percentile(values, 0.5), color=colour, linestyle=":", linewidth=1)
            ax.axvline(percentile(values, 0.95), color=colour, linestyle="--", linewidth=1)
        ax.set_title(f"N = {n} workspaces created at once")
        ax.set_xlabel("per-workspace latency (s)")
        ax.set_ylabel("fraction of workspaces up")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Provisioning latency CDF, all repeats (dotted: p50, dashed: p95)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(repeats: int = 3, sizes: tuple[int, ...] = SIZES) -> list[Figure]:
    from bench.engine import ensure_agent_image, ensure_engine

    ensure_engine()
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    setup_django("ws_provisioning_bench", redis_db=9)
    from provisioning.backends.engine import make_client

    image = ensure_agent_image()
    out_dir = Path(
        os.environ.get("BENCH_OUT_DIR") or Path(__file__).resolve().parent.parent / "docs"
    )
    log_dir = Path(tempfile.mkdtemp(prefix="bench-provisioning-"))
    floor_label = f"io.workspaces.bench-floor={uuid.uuid4().hex[:8]}"
    client = make_client()
    runs: dict[tuple[str, int], list[Run]] = {}
    try:
        with platform("provisioning", log_dir) as stack, BareEndpoint() as endpoint:
            _clean_platform(stack)
            # One untimed workspace first: imports, connections and the image's page cache warm.
            platform_run(stack, 1)
            _clean_platform(stack)
            for repeat in range(repeats):
                for n in sizes:
                    sides = ["platform", "floor"] if repeat % 2 == 0 else ["floor", "platform"]
                    for side in sides:
                        if side == "platform":
                            result = platform_run(stack, n)
                            _clean_platform(stack)
                        else:
                            result = floor_run(client, image, endpoint, floor_label, n)
                            remove_labelled(floor_label)
                        runs.setdefault((side, n), []).append(result)
                        print(
                            f"# repeat {repeat + 1} N={n} {side}: total {result.total:.2f} s, "
                            f"p50 {result.p50:.2f} s, p95 {result.p95:.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        remove_labelled(floor_label)
        client.close()

    distribution = {key: [x for r in value for x in r.latencies] for key, value in runs.items()}
    plot(distribution, tuple(n for n in sizes if n > 1) or sizes, out_dir / PLOT)
    figures = []
    for n in sizes:
        platform_runs, floor_runs = runs[("platform", n)], runs[("floor", n)]
        for metric, label in (
            ("total", "first POST to last online"),
            ("p50", "per-workspace p50"),
            ("p95", "per-workspace p95"),
        ):
            floor_label_text = {
                "total": "bare SDK: first run() to last agent call",
                "p50": "bare SDK per-container p50",
                "p95": "bare SDK per-container p95",
            }[metric]
            notes = ""
            if metric == "total":
                notes = (
                    f"{phase_notes(platform_runs, 'platform')}; {phase_notes(floor_runs, 'floor')}"
                )
            figure = Figure(
                name=f"provision N={n}: {label}",
                unit="s",
                samples=[getattr(r, metric) for r in platform_runs],
                floor_name=floor_label_text,
                floor_samples=[getattr(r, metric) for r in floor_runs],
                notes=notes,
                extra={"n": n, "metric": metric},
            )
            if n == max(sizes) and metric in ("total", "p50"):
                what = "first POST to last online" if metric == "total" else "per-workspace p50"
                figure.extra["headline"] = (
                    f"Provisioning overhead over the bare engine, N = {n} at once, {what}: "
                    f"**{figure.ratio:.2f}x** ({figure.stats['median']:.2f} s against "
                    f"{(figure.floor_stats or {}).get('median', 0):.2f} s)"
                )
            figures.append(figure)
    return figures


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
