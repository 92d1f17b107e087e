"""The steady bench's report (``bench.steady``): what one phase measured, and the block of
docs/benchmarks.md the run writes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import write_block

BEGIN, END = "<!-- steady:process:begin -->", "<!-- steady:process:end -->"


@dataclass
class Phase:
    seconds: float
    cpu: dict[str, float]  # group -> CPU seconds per second
    heartbeats: dict[str, int] = field(default_factory=dict)  # status -> count
    memory: dict[str, float] = field(default_factory=dict)  # group -> MiB (PSS) at the end

    @property
    def heartbeat_rate(self) -> float:
        return sum(self.heartbeats.values()) / self.seconds


@dataclass
class Silenced:
    workspace_id: str
    since_signal: float
    since_heartbeat: float
    back_online: float


# -- the report ------------------------------------------------------------------------------------
PARTS = [
    ("control", "control plane (gunicorn API + registry, Celery worker + beat, Caddy)"),
    ("postgres", "PostgreSQL (the bench database's server processes)"),
    ("redis", "Redis (shared with other work on the host)"),
    ("monitors", "workspace monitors (the process backend's, one per workspace)"),
    ("workspaces", "workspace processes (agents serving their page; floor: page servers)"),
]


def _cell(value: float) -> str:
    return f"{value:.3f} ({value * 100:.1f} %)"


def report(
    n: int,
    idle: Phase,
    steady: Phase,
    floors: list[Phase],
    silenced: list[Silenced],
    failures: int,
    timings: dict[str, float],
) -> list[str]:
    from django.conf import settings

    floor = {
        key: statistics.mean(phase.cpu.get(key, 0.0) for phase in floors)
        for key in {*steady.cpu, *floors[0].cpu}
    }
    per_k = 1000 / n
    above_idle = sum(steady.cpu[k] - idle.cpu[k] for k in ("control", "postgres"))
    per_beat = above_idle / steady.heartbeat_rate if steady.heartbeat_rate else float("nan")
    lines = [
        f"CPU seconds per second (and % of one core) over {steady.seconds:.0f} s, "
        f"N = {n} online workspaces; floor: the mean of {len(floors)} phases, before and after.",
        "",
        "| part | platform, N online | per 1,000 workspaces | floor | platform - floor |",
        "|---|---|---|---|---|",
    ]
    for key, label in PARTS:
        here, there = steady.cpu.get(key, 0.0), floor.get(key, 0.0)
        lines.append(
            f"| {label} | {_cell(here)} | {here * per_k:.3f} | {_cell(there)} | "
            f"{here - there:+.3f} |"
        )
    extra = sum(steady.cpu.get(k, 0.0) - floor.get(k, 0.0) for k, _ in PARTS if k != "redis")
    total_here = sum(steady.cpu.get(k, 0.0) for k, _ in PARTS if k != "redis")
    total_floor = sum(floor.get(k, 0.0) for k, _ in PARTS if k != "redis")
    ratio = f"{total_here / total_floor:.1f}x" if total_floor else "-"
    lines += [
        f"| **total, Redis aside** | {_cell(total_here)} | {total_here * per_k:.3f} | "
        f"{_cell(total_floor)} | **{extra:+.3f}** ({ratio}) |",
        f"| the whole machine (all work on it) | {_cell(steady.cpu['machine'])} | - | "
        f"{_cell(floor['machine'])} | {steady.cpu['machine'] - floor['machine']:+.3f} |",
        "",
        f"- control plane idle (platform up, no workspace, {idle.seconds:.0f} s): "
        f"{_cell(idle.cpu['control'])} CPU/s; with N online: {_cell(steady.cpu['control'])}, "
        f"so {(steady.cpu['control'] - idle.cpu['control']) * per_k:.3f} CPU/s per 1,000 "
        "workspaces above idle",
        "- the control plane by process tree, CPU/s with N online (idle): "
        + ", ".join(
            f"{key.removeprefix('control:')} {steady.cpu[key]:.3f} ({idle.cpu.get(key, 0.0):.3f})"
            for key in sorted(steady.cpu)
            if key.startswith("control:")
        ),
        f"- workspaces' own CPU against the floor's: "
        f"{steady.cpu['workspaces'] / floor['workspaces']:.2f}x"
        if floor.get("workspaces")
        else "- floor measured no workspace CPU",
        f"- heartbeats: {steady.heartbeat_rate:.1f}/s "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(steady.heartbeats.items())) or 'none'}); "
        f"expected N / AGENT_HEARTBEAT_SECONDS = {n / settings.AGENT_HEARTBEAT_SECONDS:.1f}/s; "
        f"control plane + PostgreSQL {per_beat * 1000:.2f} ms CPU per heartbeat above idle; "
        f"{failures} heartbeats the agents could not deliver (whole run)",
        f"- memory (PSS at the end of the window): workspace processes "
        f"{steady.memory.get('workspaces', 0.0) / n:.1f} MiB and monitors "
        f"{steady.memory.get('monitors', 0.0) / n:.1f} MiB per workspace, against "
        f"{statistics.mean(f.memory.get('workspaces', 0.0) for f in floors) / n:.1f} MiB per "
        f"page server on the floor; control plane {steady.memory.get('control', 0.0):.0f} MiB",
        f"- {n} workspaces created and online in {timings['online']:.0f} s, removed in "
        f"{timings['removed']:.0f} s",
        "",
        f"Offline detection (LIVENESS_WINDOW_SECONDS={settings.LIVENESS_WINDOW_SECONDS}, "
        f"LIVENESS_SWEEP_INTERVAL_SECONDS={settings.LIVENESS_SWEEP_INTERVAL_SECONDS}: bound "
        f"{settings.LIVENESS_WINDOW_SECONDS + settings.LIVENESS_SWEEP_INTERVAL_SECONDS} s after "
        f"the last heartbeat; AGENT_HEARTBEAT_SECONDS={settings.AGENT_HEARTBEAT_SECONDS:g}), "
        f"{len(silenced)} agents stopped with SIGSTOP at once:",
        "",
        "| workspace | offline after SIGSTOP | after its last heartbeat | online after SIGCONT |",
        "|---|---|---|---|",
        *(
            f"| {s.workspace_id[:8]} | {s.since_signal:.1f} s | {s.since_heartbeat:.1f} s | "
            f"{s.back_online:.1f} s |"
            for s in silenced
        ),
    ]
    return lines


def write_doc(section: list[str], path: Path) -> None:
    """Replace the block of the report between this bench's markers, or append it."""
    write_block(path, BEGIN, END, section)
