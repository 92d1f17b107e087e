"""``python -m bench``: run every benchmark and write docs/benchmarks.md.

Each module measures its figures side by side with their floors in the same run and returns
``bench.common.Figure`` objects. Every module runs in its own Python process (Django's settings
are loaded once per process, and each module points them at its own database); the child sends
its figures back as JSON. The command exits non-zero only when a benchmark fails to run, never
because a number is high.

``python -m bench peer [options]`` runs the JupyterHub comparison instead (``bench.peer``: an
optional dependency group, not part of the default run); the default run keeps its section of
the report. ``python -m bench server_path --against REV`` likewise (``bench.server_path``: this
tree's web and registry processes against another revision's, served side by side).

When ``DATABASE_URL`` is set, module ``<name>`` gets ``<that database>_<name>``, so benches never
share tables. The Docker benches use the engine in ``DOCKER_HOST``, or one private dockerd that
the runner starts for the whole run and stops at the end (``bench.engine.ensure_engine``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.common import Figure

MODULES = [
    "gate",
    "activity",
    "sweeper",
    "api",
    "streams",
    "reconcile",
    "docker_backend",
    "provisioning",
    "restart_storm",
    "proxy",
    "swarm_backend",
    "process_namespace",
    "pools",
    "sandbox",
]
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks.md"


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"


def machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import celery
    import django
    import docker
    import redis

    redis_info = _cmd(["redis-cli", "info", "server"])
    redis_version = (
        redis_info.split("redis_version:")[-1].split()[0]
        if "redis_version:" in redis_info
        else "unavailable"
    )
    postgres = _cmd(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "show server_version"])
    engine = _cmd(["docker", "version", "--format", "{{.Server.Version}}"]) or "not running"
    return [
        f"- machine: {platform.machine()}, {cpu}, {_cmd(['nproc'])} cores, "
        f"{mem_kb / 1024 / 1024:.1f} GiB, {platform.platform()}",
        f"- Python {platform.python_version()}, Django {django.get_version()}, "
        f"Celery {celery.__version__}, redis-py {redis.__version__}, "
        f"docker SDK {docker.__version__}",
        f"- PostgreSQL {postgres}, Redis {redis_version}, Docker engine {engine}",
    ]


def table(figures: list[Figure]) -> list[str]:
    lines = [
        "| figure | min | median | max | floor | floor median | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for figure in figures:
        s = figure.stats
        floor = figure.floor_stats
        ratio = f"{figure.ratio:.2f}" if figure.ratio is not None else "-"
        floor_median = f"{floor['median']:.4g} {figure.unit}" if floor else "-"
        lines.append(
            f"| {figure.name} | {s['min']:.4g} | {s['median']:.4g} | {s['max']:.4g} {figure.unit} "
            f"| {figure.floor_name or '-'} | {floor_median} | {ratio} |"
        )
    return lines


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


DOCKER_MODULES = {"docker_backend", "pools", "provisioning", "restart_storm", "sandbox"}


def _module_env(name: str) -> dict[str, str]:
    """The child's environment: its own database when the caller named one."""
    env = dict(os.environ)
    env.setdefault("LOG_LEVEL", "ERROR")  # the figures, not a log line per event or flip
    base = env.get("DATABASE_URL")
    if base:
        url = urlsplit(base)
        database = url.path.lstrip("/") or "workspaces"
        env["DATABASE_URL"] = urlunsplit(url._replace(path=f"/{database}_{name}"))
        if name == "sweeper":
            env.setdefault("SWEEPER_BENCH_DATABASE_URL", env["DATABASE_URL"])
    return env


def _run_child(name: str, repeats: int, out: Path) -> tuple[list[Figure], str] | None:
    """Run one module in its own process; None when it failed (its output says why)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as folder:
        result = Path(folder) / "figures.json"
        env = {**_module_env(name), "BENCH_OUT_DIR": str(out.parent)}
        command = [sys.executable, "-m", "bench", "--child", name, "--repeats", str(repeats)]
        code = subprocess.run([*command, "--json", str(result)], env=env, cwd=REPO).returncode
        if code != 0 or not result.exists():
            return None
        data = json.loads(result.read_text())
    return [Figure(**figure) for figure in data["figures"]], data["doc"]


def _child(name: str, repeats: int, result: Path) -> int:
    module = importlib.import_module(f"bench.{name}")
    figures: list[Figure] = module.run(repeats)
    doc = (module.__doc__ or "").strip()
    payload = {"figures": [dataclasses.asdict(figure) for figure in figures], "doc": doc}
    result.write_text(json.dumps(payload, default=str))
    return 0


def _kept_sections(path: Path) -> list[str]:
    """The peer, steady and server_path blocks of the existing report (``bench.peer``,
    ``bench.steady`` and ``bench.server_path`` write them between markers), in the order they
    appear."""
    from bench.peer import MARKERS as PEER
    from bench.server_path import MARKERS as SERVER_PATH
    from bench.steady import MARKERS as STEADY

    try:
        text = path.read_text()
    except OSError:
        return []
    found = sorted(
        [*PEER.finditer(text), *STEADY.finditer(text), *SERVER_PATH.finditer(text)],
        key=lambda match: match.start(),
    )
    return [match.group(0).rstrip("\n") + "\n" for match in found]


def main() -> int:
    if sys.argv[1:2] == ["peer"]:
        from bench.peer import main as peer

        return peer(sys.argv[2:])
    if sys.argv[1:2] == ["steady"]:
        from bench.steady import main as steady

        return steady(sys.argv[2:])
    if sys.argv[1:2] == ["server_path"]:
        from bench.server_path import main as server_path

        return server_path(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--only", nargs="*", choices=MODULES, help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=OUT, help="the report to write")
    parser.add_argument("--child", choices=MODULES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.repeats, args.json)

    started = time.time()
    load_before = _load()
    names = args.only or MODULES
    if DOCKER_MODULES & set(names):
        # One engine for the whole run: children inherit DOCKER_HOST (and build the image once).
        from bench.engine import ensure_engine

        ensure_engine()
    sections: list[str] = []
    headlines: list[str] = []
    failed: list[str] = []
    for name in names:
        print(f"== {name}", flush=True)
        outcome = _run_child(name, args.repeats, args.out)
        if outcome is None:
            failed.append(name)
            sections += [f"## {name}", "", "**failed to run** (see the command's output)", ""]
            continue
        figures, doc = outcome
        for figure in figures:
            print(figure.line(), flush=True)
            if figure.extra.get("headline"):
                headlines.append(f"- {figure.extra['headline']}")
        sections += [f"## {name}", "", doc, "", *table(figures), ""]
        for figure in figures:
            if figure.notes:
                sections += [f"- **{figure.name}**: {figure.notes}"]
        sections.append("")

    command = "python -m bench " + " ".join(sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    report = [
        "# Benchmarks",
        "",
        f"Made by `{command.strip()}` on {when} "
        f"in {time.time() - started:.0f} s. Each figure is min / median / max over "
        f"{args.repeats} runs; its floor was measured side by side in the same run, and the ratio "
        "is median / floor median.",
        "",
        *machine(),
        f"- load: this machine is shared; other work was running during the run (load average "
        f"{load_before} at the start, {_load()} at the end). Floors pay for it alike, so read "
        "ratios rather than absolute numbers.",
        "",
        *(["## Headlines", "", *headlines, ""] if headlines else []),
        *sections,
        *_kept_sections(args.out),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print(f"wrote {args.out}")
    if failed:
        print(f"benchmarks that failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
