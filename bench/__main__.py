"""``python -m bench``: run every benchmark and write docs/benchmarks.md.

Each module measures its figures side by side with their floors in the same run and returns
``bench.common.Figure`` objects. The command exits non-zero only when a benchmark fails to run,
never because a number is high.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench.common import Figure

MODULES = ["gate", "sweeper", "api", "reconcile", "provisioning", "restart_storm"]
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--only", nargs="*", choices=MODULES, help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=OUT, help="the report to write")
    args = parser.parse_args()

    started = time.time()
    sections: list[str] = []
    failed: list[str] = []
    for name in args.only or MODULES:
        print(f"== {name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            figures: list[Figure] = module.run(args.repeats)
        except Exception:  # a broken benchmark is reported and fails the command at the end
            failed.append(name)
            traceback.print_exc()
            sections += [f"## {name}", "", "**failed to run** (see the command's output)", ""]
            continue
        for figure in figures:
            print(figure.line(), flush=True)
        doc = (module.__doc__ or "").strip()
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
        "",
        *sections,
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
