"""The peer comparison's report: the table on stdout, the variant's block of docs/benchmarks.md
(between markers that ``python -m bench`` keeps) and its plot ``docs/peer-<variant>.png``."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import write_block
from bench.peer.hub import CHP
from bench.peer.rounds import Run
from bench.stack import REPO

DOC = REPO / "docs" / "benchmarks.md"
PLOT = "peer-{variant}.png"
# Each variant (this platform's DOCKER_NETWORK_MODE, or the process backend) writes its block
# between its markers; ``python -m bench`` keeps every such block when it rewrites the report.
MARKERS = re.compile(r"<!-- peer:(\w+):begin -->.*?<!-- peer:\1:end -->\n?", re.DOTALL)


# What a run with ``--pool`` measures, said once in each of its blocks.
POOLED = (
    "Here every request is served by a member of the template's warm pool "
    "(`WORKSPACE_POOL_SIZES`, sized to the largest N): each round begins from a full pool "
    "(untimed), and its CPU is read once the pool is full again, so a workspace's CPU includes "
    "the start of the member that replaces the one it took. The hub has no pool."
)


@dataclass(frozen=True)
class Start:
    """When a run began, the machine's load average then, and the folder of the run's logs."""

    at: float
    load: list[str]
    log_dir: Path

    @classmethod
    def now(cls) -> Start:
        log_dir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
        print(f"# logs in {log_dir}", file=sys.stderr, flush=True)
        return cls(time.time(), _load(), log_dir)


def _load() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def markers(variant: str) -> tuple[str, str]:
    return f"<!-- peer:{variant}:begin -->", f"<!-- peer:{variant}:end -->"


@dataclass(frozen=True)
class Variant:
    """What a comparison calls its parts: the report's block and plot, the CPU column of the
    workspaces' own side, the phases here, the sides' names, the hub's spawner (with its
    version) and this platform's setting that makes the variant."""

    name: str  # the block's markers and the plot's name (a word: MARKERS)
    own: str  # the Run.cpu key of the workspaces' own side: "engine" or "workspace"
    own_column: str
    own_title: str
    phases: dict[str, str]
    here_label: str
    hub_label: str
    spawner: str
    setting: str


def _median(runs: list[Run], what: str) -> float:
    if what in ("total", "p50"):
        return statistics.median(getattr(run, what) for run in runs)
    n = len(runs[0].latencies)
    return statistics.median(run.cpu.get(what, float("nan")) for run in runs) / n * 1000


def _median_sum(runs: list[Run], parts: tuple[str, ...]) -> float:
    """The median over rounds of the parts' CPU added up in each round, ms per workspace."""
    n = len(runs[0].latencies)
    return statistics.median(sum(run.cpu.get(p, 0.0) for p in parts) for run in runs) / n * 1000


def _resent(run: Run) -> str:
    return f" ({run.resent} reset, sent again)" if run.resent else ""


def report(
    runs: dict[tuple[str, int], list[Run]], sizes: list[int], args: Any, variant: Variant
) -> list[str]:
    lines = [
        f"| N | total: here | hub | ratio | p50: here | hub | ratio | {variant.own_column}: here "
        "| hub | ratio | control-plane CPU/ws: here | hub | ratio | PostgreSQL | Redis "
        "| control + PostgreSQL + Redis: here | ratio to the hub's control plane |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        here, hub = runs[("here", n)], runs[("hub", n)]
        cells = [str(n)]
        for what, unit in (("total", "s"), ("p50", "s"), (variant.own, "ms"), ("control", "ms")):
            a, b = _median(here, what), _median(hub, what)
            fmt = "{:.2f} " if unit == "s" else "{:.0f} "
            cells += [fmt.format(a) + unit, fmt.format(b) + unit, f"{a / b:.2f}" if b else "-"]
        postgres, redis = _median(here, "postgres"), _median(here, "redis")
        whole = _median_sum(here, ("control", "postgres", "redis"))
        cells += [f"{postgres:.0f} ms", f"{redis:.0f} ms", f"{whole:.0f} ms"]
        cells.append(f"{whole / _median(hub, 'control'):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Medians over {args.rounds} rounds per side and N; ratio = here / hub (below 1: this "
        "platform is ahead). Every round, total and p50 in seconds:"
    )
    lines.append("")
    for n in sizes:
        parts = []
        for side in ("here", "hub"):
            listed = ", ".join(f"{r.total:.2f}/{r.p50:.2f}{_resent(r)}" for r in runs[(side, n)])
            parts.append(f"{side} {listed}")
        lines.append(f"- N = {n}: " + "; ".join(parts))
    lines += ["", "Here, the control plane's CPU by process tree, median ms per workspace:", ""]
    for n in sizes:
        here = runs[("here", n)]
        names = sorted({key for run in here for key in run.cpu if key.startswith("control:")})
        split = ", ".join(f"{name[len('control:') :]} {_median(here, name):.0f}" for name in names)
        lines.append(f"- N = {n}: {split}")
    lines += ["", "Here, median seconds per workspace in each phase (all rounds):", ""]
    for n in sizes:
        parts = []
        for phase, meaning in variant.phases.items():
            values = [x for run in runs[("here", n)] for x in run.phases.get(phase, [])]
            if values:
                parts.append(f"{meaning} {statistics.median(values):.2f}")
        lines.append(f"- N = {n}: " + ", ".join(parts))
    return lines


def plot(
    runs: dict[tuple[str, int], list[Run]], sizes: list[int], path: Path, variant: Variant
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    sides = (
        ("here", "tab:blue", variant.here_label),
        ("hub", "tab:orange", variant.hub_label),
    )
    for side, colour, label in sides:
        totals = [_median(runs[(side, n)], "total") for n in sizes]
        p50s = [_median(runs[(side, n)], "p50") for n in sizes]
        axes[0].plot(sizes, totals, "o-", color=colour, label=f"{label}: total")
        axes[0].plot(sizes, p50s, "s--", color=colour, label=f"{label}: p50")
        own = [_median(runs[(side, n)], variant.own) for n in sizes]
        control = [_median(runs[(side, n)], "control") for n in sizes]
        axes[1].plot(sizes, own, "o-", color=colour, label=f"{label}: {variant.own}")
        axes[1].plot(sizes, control, "s--", color=colour, label=f"{label}: control plane")
    n_max = max(sizes)
    for side, colour, label in sides:
        values = sorted(x for run in runs[(side, n_max)] for x in run.latencies)
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axes[2].step(values, fractions, where="post", color=colour, label=label, linewidth=2)
    axes[0].set(
        xscale="log",
        xlabel="N requested at once",
        ylabel="seconds",
        title="first request to last up (total), per-server p50",
    )
    axes[1].set(
        xscale="log",
        xlabel="N requested at once",
        ylabel="CPU ms per workspace",
        title=f"CPU per workspace ({variant.own_title})",
    )
    axes[2].set(
        xlabel="per-server latency (s)",
        ylabel="fraction up",
        ylim=(0, 1.02),
        title=f"N = {n_max}: latency CDF, all rounds",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(
    runs: dict[tuple[str, int], list[Run]],
    args: Any,
    argv: list[str] | None,
    variant: Variant,
    heading: list[str],
    start: Start,
) -> None:
    """The plot, the table on stdout, and the variant's block of the report: ``heading``, how
    and when it was made, the table, the plot."""
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    image_name = PLOT.format(variant=variant.name)
    plot(runs, args.sizes, out_dir / image_name, variant)
    table = report(runs, args.sizes, args, variant)
    print("\n".join(table))
    import jupyterhub

    chp = subprocess.run([str(CHP), "--version"], capture_output=True, text=True).stdout.strip()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    command = "python -m bench peer " + " ".join(argv if argv is not None else sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start.at))
    section = [
        *heading,
        f"Made by `{command.strip()}` on {when} in {time.time() - start.at:.0f} s, "
        f"{os.cpu_count()} cores shared with other work (load average "
        f"{' '.join(start.load)} at the start, {' '.join(_load())} at the end); JupyterHub "
        f"{jupyterhub.__version__}, {variant.spawner}, configurable-http-proxy {chp} on Node "
        f"{node}; this platform with {variant.setting}, its processes from the Procfile.",
        "",
        *table,
        "",
        f"![JupyterHub against this platform, {variant.setting}]({image_name})",
        "",
    ]
    write_block(args.out, *markers(variant.name), section)
    print(f"wrote {args.out} and {out_dir / image_name}")
