"""Steady state on the process backend: what N online workspaces cost the platform per second,
against the same N workspace programs running with no platform, in one run.

**Platform**: the stack as users run it (``bench.stack.platform``): gunicorn (API, 2 workers x 4
threads), the registry listener (1 process, uvicorn, 4 threads), one Celery worker (prefork, 4,
consuming the lifecycle and sweep queues as the Procfile's worker does), Celery beat (the sweeps:
stuck provisioning, liveness, reconciliation, idle, redrive) and Caddy as the proxy, with access
logs as in the Procfile, on ``WORKSPACE_BACKEND=process`` with uid isolation. N workspaces of
template ``shell-default`` are created through the API and run until every one is ``online``; after
a settling time the bench measures over ``--seconds``. Each workspace is the platform's agent (one
Python process under the workspace's own uid: it serves the template's page on its app port,
heartbeats every ``AGENT_HEARTBEAT_SECONDS`` and checks that its page answers before each beat)
under the backend's monitor (a Python process of the platform's that waits for it and records its
exit code).

**Floor**: the same N page servers (the agent's own page server, on the agent's interpreter
flags, a port each), started directly with no platform, no agent loop and no monitor, measured
the same way over the same number of seconds. At rest they block in ``accept``: the floor's CPU
is close to nothing, so the workspaces' figure is what the agents' loops cost. One floor phase
runs before the platform starts and one after it is gone; the floor figure is their mean, so
drift over the run hits both sides.

CPU seconds per second are read from ``/proc`` (user + system, with reaped children) for:

* the control plane: gunicorn (API and registry), the Celery worker and its pool, beat and Caddy
  (their process trees);
* PostgreSQL: the server processes serving the bench's database (``pg_stat_activity``); the
  server's shared processes (WAL writer, checkpointer) are not counted;
* Redis: ``redis-server``, which is shared with other work on the host (counted in both phases);
* the workspaces: every process of the workspace uids (agents and what they run), and the
  monitors apart; on the floor, the page servers.

Heartbeats per second are counted in the registry listener's access log (each
``POST /api/registry/heartbeat`` and its status); the control plane is also measured idle, with
the platform up and no workspace, for the part that does not grow with N.

Offline detection: after the measurement a few agents are stopped with SIGSTOP (alive, silent:
what the liveness sweep exists for); the bench records how long each takes to turn ``offline``
(since the signal and since its last heartbeat), against the documented bound
``LIVENESS_WINDOW_SECONDS`` + ``LIVENESS_SWEEP_INTERVAL_SECONDS``, then sends SIGCONT and waits
for each to be ``online`` again. Every workspace is then removed through the API.

    python -m bench steady [--workspaces 1000] [--seconds 60] [--settle 30] [--silenced 5]

Runs as root (uid isolation). Uses ``DATABASE_URL`` (default ``ws_steady_bench``), ``REDIS_URL``,
and the platform's settings from the environment: ``WORKSPACE_UID_RANGE`` (N uids needed),
``WORKSPACE_APP_PORTS``, ``WORKSPACE_FIREWALL_CHAIN`` (another platform on the same host needs
its own uid range, port range and chain). Writes its block of docs/benchmarks.md (between
markers that ``python -m bench`` keeps).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import postgres_backends, setup_django
from bench.engine import TICKS, Proc, descendants, processes
from bench.stack import REPO, Platform, platform, wait_until
from bench.steady_report import Phase, Silenced, report, write_doc

DOC = REPO / "docs" / "benchmarks.md"
OWNER = "steady"
MARKERS = re.compile(r"<!-- steady:(\w+):begin -->.*?<!-- steady:\1:end -->\n?", re.DOTALL)
# gunicorn's access line ('... "POST /api/registry/heartbeat HTTP/1.1" 200 88 ...') and uvicorn's
# ('... "POST /api/registry/heartbeat HTTP/1.1" 200' at the end of the line) alike.
HEARTBEAT = re.compile(rb'"POST /api/registry/heartbeat[^"]*" (\d{3})\b')
# The floor's program: the agent's page, served as the agent serves it (its own page server, on
# an interpreter started with the agent's flags), and nothing else.
FLOOR_SERVER = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from workspace_agent import _page_server
_page_server(int(sys.argv[2]))
threading.Event().wait()
"""


# -- reading /proc ---------------------------------------------------------------------------------
def memory(pids: set[int]) -> float:
    """The processes' proportional set size (shared pages split among their users), in MiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total / 1024


def memory_available() -> float:
    """MemAvailable of the whole machine, in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


# Each workspace costs a few dozen MiB; on a shared machine the bench stops creating (and
# removes what it made) before the kernel's OOM killer picks someone else's process.
MEMORY_RESERVE_MIB = 1536.0


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every core, kernel included)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / TICKS


Groups = Callable[[dict[int, Proc]], dict[str, set[int]]]


def measure(seconds: float, groups: Groups, database: str, registry_log: Path | None) -> Phase:
    """CPU per second of each group over ``seconds``: a process counts with what it used in the
    window (all of it when it started meanwhile)."""
    offset = registry_log.stat().st_size if registry_log else 0
    pg_before = postgres_backends(database)
    before, busy_before, started = processes(), machine_busy(), time.monotonic()
    time.sleep(seconds)
    after, busy_after, elapsed = processes(), machine_busy(), time.monotonic() - started
    pg = pg_before | postgres_backends(database)
    sets = {**groups(after), "postgres": {pid for pid in pg if pid in after}}
    sets["redis"] = {pid for pid, proc in after.items() if proc.command.startswith("redis-server")}
    cpu = {
        name: sum(after[pid].cpu - (before[pid].cpu if pid in before else 0.0) for pid in pids)
        / elapsed
        for name, pids in sets.items()
    }
    cpu["machine"] = (busy_after - busy_before) / elapsed
    mib = {
        name: memory(pids)
        for name, pids in sets.items()
        if name not in ("postgres", "redis") and not name.startswith("control:")
    }
    beats: dict[str, int] = {}
    if registry_log:
        with open(registry_log, "rb") as handle:
            handle.seek(offset)
            for match in HEARTBEAT.finditer(handle.read()):
                status = match.group(1).decode()
                beats[status] = beats.get(status, 0) + 1
    return Phase(elapsed, cpu, beats, mib)


# -- the floor -------------------------------------------------------------------------------------
def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def floor_servers(n: int, ports: list[int], agent_dir: Path) -> Iterator[list[int]]:
    """N page servers, each in a session of its own; yields their pids, stops them by pid."""
    from django.conf import settings

    from provisioning.agent import AGENT_PYTHON_FLAGS

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports[:n]:
            if len(procs) % 50 == 0 and memory_available() < MEMORY_RESERVE_MIB:
                raise RuntimeError(f"out of memory at {len(procs)} floor servers")
            procs.append(
                subprocess.Popen(
                    [
                        settings.WORKSPACE_PYTHON,
                        *AGENT_PYTHON_FLAGS,
                        "-c",
                        FLOOR_SERVER,
                        str(agent_dir),
                        str(port),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        for port in ports[:n]:
            wait_until(functools.partial(_answers, port), 120, f"floor server on {port}", 0.05)
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def floor_phase(
    n: int, ports: list[int], agent_dir: Path, settle: float, seconds: float, database: str
) -> Phase:
    with floor_servers(n, ports, agent_dir) as pids:
        time.sleep(settle)
        return measure(
            seconds, lambda snapshot: {"workspaces": descendants(snapshot, pids)}, database, None
        )


# -- the platform ----------------------------------------------------------------------------------
def _in_range(uid: int) -> bool:
    from django.conf import settings

    low, high = settings.WORKSPACE_UID_RANGE
    return bool(low <= uid <= high)


def platform_groups(stack: Platform) -> Groups:
    def groups(snapshot: dict[int, Proc]) -> dict[str, set[int]]:
        workspaces = {pid for pid, proc in snapshot.items() if _in_range(proc.uid)}
        monitors = {
            snapshot[pid].parent
            for pid in workspaces
            if snapshot[pid].parent in snapshot
            and not _in_range(snapshot[snapshot[pid].parent].uid)
        }
        return {
            "control": descendants(snapshot, stack.pids) - workspaces - monitors,
            "workspaces": workspaces,
            "monitors": monitors,
            # The control plane by process tree (web, registry, worker0, beat, caddy).
            **{
                f"control:{name}": descendants(snapshot, [pid]) - workspaces - monitors
                for name, pid in stack.parts.items()
            },
        }

    return groups


def _owned() -> Any:
    from workspaces.models import Workspace

    return Workspace.objects.filter(owner__username=f"bench-{OWNER}")


def create(stack: Platform, n: int, timeout: float) -> float:
    """Create N workspaces through the API (8 at a time) and wait until all are online; returns
    the seconds from the first request to the last one online."""
    from workspaces.status import WorkspaceStatus

    tag = uuid.uuid4().hex[:6]
    started = time.monotonic()

    def post(index: int) -> None:
        body = {"name": f"s{tag}-{index}", "template": "shell-default"}
        status, answer = stack.request("POST", "/api/workspaces/", body)
        if status != 201:
            raise RuntimeError(f"POST /api/workspaces/ answered {status}: {answer}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(post, range(n)))
    last_report = 0.0

    def all_online() -> bool:
        nonlocal last_report
        failed = list(_owned().filter(status=WorkspaceStatus.FAILED).values_list("last_error"))
        if failed:
            raise RuntimeError(f"{len(failed)} failed, e.g.: {failed[0][0]}")
        online = _owned().filter(status=WorkspaceStatus.ONLINE).count()
        if memory_available() < MEMORY_RESERVE_MIB:
            raise RuntimeError(
                f"out of memory at {online} workspaces online: MemAvailable "
                f"{memory_available():.0f} MiB < {MEMORY_RESERVE_MIB:.0f} MiB"
            )
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            print(f"# {online}/{n} online after {time.monotonic() - started:.0f} s", flush=True)
        return online >= n

    wait_until(all_online, timeout, f"{n} workspaces online", interval=1.0)
    return time.monotonic() - started


def remove_all(stack: Platform, timeout: float) -> float:
    from workspaces.status import WorkspaceStatus

    started = time.monotonic()
    ids = [
        str(pk)
        for pk in _owned().exclude(status=WorkspaceStatus.REMOVED).values_list("id", flat=True)
    ]

    def delete(workspace_id: str) -> None:
        status, answer = stack.request("DELETE", f"/api/workspaces/{workspace_id}/")
        if status not in (202, 404):
            raise RuntimeError(f"DELETE answered {status}: {answer}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(delete, ids))

    def gone() -> bool:
        return not _owned().exclude(status=WorkspaceStatus.REMOVED).exists()

    wait_until(gone, timeout, "every workspace removed", interval=1.0)
    return time.monotonic() - started


def kill_leftovers(data_dir: Path) -> int:
    """SIGKILL any process still working in a workspace folder of this run (a removal that did
    not finish); returns how many there were."""
    found = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "cwd").startswith(f"{data_dir}/"):
                os.kill(int(entry.name), signal.SIGKILL)
                found += 1
    return found


def heartbeat_failures(data_dir: Path) -> int:
    """Heartbeats the agents could not deliver (timeouts, refused connections), whole run."""
    count = 0
    for log in data_dir.glob("*/agent.log"):
        with contextlib.suppress(OSError):
            count += log.read_bytes().count(b"heartbeat failed")
    return count


def offline_detection(data_dir: Path, count: int) -> list[Silenced]:
    """SIGSTOP ``count`` agents, time their flip to offline, SIGCONT, time their return."""
    from django.conf import settings

    from workspaces.models import WorkspaceEvent
    from workspaces.status import EventType, WorkspaceStatus

    rows = list(_owned().order_by("id").values_list("id", "last_heartbeat_at"))
    chosen = rows[:: max(1, len(rows) // count)][:count]
    pids = {}
    for workspace_id, _ in chosen:
        instance = json.loads((data_dir / str(workspace_id) / "instance.json").read_text())
        pids[str(workspace_id)] = int(instance["pid"])
    bound = settings.LIVENESS_WINDOW_SECONDS + settings.LIVENESS_SWEEP_INTERVAL_SECONDS
    stopped_at = time.time()
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        # The last heartbeat each delivered before the signal (one may still land just after).
        wait_until(
            lambda: (
                _owned().filter(id__in=list(pids), status=WorkspaceStatus.OFFLINE).count()
                == len(pids)
            ),
            bound + 60,
            "the silenced workspaces offline",
            interval=0.2,
        )
    finally:
        continued_at = time.time()
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: (
            _owned().filter(id__in=list(pids), status=WorkspaceStatus.ONLINE).count() == len(pids)
        ),
        60,
        "the silenced workspaces online again",
        interval=0.2,
    )
    events = WorkspaceEvent.objects.filter(workspace_id__in=list(pids))
    offline = dict(
        events.filter(type=EventType.OFFLINE)
        .order_by("created_at")
        .values_list("workspace_id", "created_at")
    )
    back = dict(
        events.filter(type=EventType.ONLINE, created_at__gt=min(offline.values()))
        .order_by("created_at")
        .values_list("workspace_id", "created_at")
    )
    results = []
    for workspace_id, _ in chosen:
        payload = (
            events.filter(workspace_id=workspace_id, type=EventType.OFFLINE)
            .values_list("payload", flat=True)
            .first()
        ) or {}
        flipped = offline[workspace_id].timestamp()
        last_beat = payload.get("last_heartbeat_at")
        beat_at = _parse_time(last_beat) if last_beat else stopped_at
        results.append(
            Silenced(
                str(workspace_id),
                flipped - stopped_at,
                flipped - beat_at,
                back[workspace_id].timestamp() - continued_at,
            )
        )
    return results


def _parse_time(value: str) -> float:
    from django.utils.dateparse import parse_datetime

    parsed = parse_datetime(value)
    if parsed is None:
        raise ValueError(f"not a time: {value!r}")
    return parsed.timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench steady",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workspaces", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="each measured phase")
    parser.add_argument("--settle", type=float, default=30.0, help="before each measurement")
    parser.add_argument("--silenced", type=int, default=5, help="agents stopped (SIGSTOP)")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    n = args.workspaces
    if n < 1 or not 1 <= args.silenced <= n:
        # The run measures offline detection too: at least one agent is silenced.
        parser.error(f"--silenced must be between 1 and --workspaces ({n}), not {args.silenced}")

    os.environ.setdefault("LOG_LEVEL", "WARNING")
    started = time.time()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    setup_django("ws_steady_bench", redis_db=11)
    from django.conf import settings
    from django.db import connection

    from provisioning.agent import AGENT_SCRIPT

    low, high = settings.WORKSPACE_UID_RANGE
    if high - low + 1 < n:
        raise SystemExit(f"WORKSPACE_UID_RANGE={low}-{high} has fewer than {n} uids")
    database = str(connection.settings_dict["NAME"])
    log_dir = Path(tempfile.mkdtemp(prefix="bench-steady-"))
    data_dir = log_dir / "workspaces"
    data_dir.mkdir()
    log_dir.chmod(0o711)  # workspace uids traverse it to their folders
    print(f"# logs and workspace folders in {log_dir}", file=sys.stderr, flush=True)
    ports_low, ports_high = settings.WORKSPACE_APP_PORT_RANGE
    ports = [port for port in range(ports_low, ports_high + 1)][:n]

    def floor() -> Phase:
        phase = floor_phase(n, ports, AGENT_SCRIPT.parent, args.settle, args.seconds, database)
        print(f"# floor: {phase.cpu}", file=sys.stderr, flush=True)
        return phase

    floors = [floor()]
    env = {"WORKSPACE_DATA_DIR": str(data_dir)}
    timings: dict[str, float] = {}
    with platform(OWNER, log_dir, "process", env, proxy=True, beat=True, access_log=True) as stack:
        registry_log = log_dir / "registry.log"
        groups = platform_groups(stack)
        try:
            time.sleep(args.settle)
            idle = measure(args.seconds, groups, database, registry_log)
            print(f"# idle: {idle.cpu}", file=sys.stderr, flush=True)
            timings["online"] = create(stack, n, timeout=max(600.0, n * 2.0))
            time.sleep(args.settle)
            steady = measure(args.seconds, groups, database, registry_log)
            print(f"# steady: {steady.cpu} {steady.heartbeats}", file=sys.stderr, flush=True)
            failures = heartbeat_failures(data_dir)
            silenced = offline_detection(data_dir, args.silenced)
        finally:
            try:
                timings["removed"] = remove_all(stack, timeout=max(600.0, n * 2.0))
            finally:
                left = kill_leftovers(data_dir)
                if left:
                    print(f"# killed {left} leftover workspace processes", file=sys.stderr)
                _owned().delete()
    floors.append(floor())

    table = report(n, idle, steady, floors, silenced, failures, timings)
    print("\n".join(table))
    command = "python -m bench steady " + " ".join(argv if argv is not None else sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    section = [
        "## steady: N online workspaces at rest, process backend",
        "",
        (__doc__ or "").strip(),
        "",
        f"Made by `{command.strip()}` on {when} in {time.time() - started:.0f} s, "
        f"{os.cpu_count()} cores shared with other work (load average {load_before} at the "
        f"start, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end).",
        "",
        *table,
        "",
    ]
    write_doc(section, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
