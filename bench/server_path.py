"""``python -m bench server_path --against REV``: the web process's path per request, this
checkout against another revision of it, both served in the same run.

The other revision is checked out in a temporary git worktree (``git worktree add --detach``)
with a venv of its own (``uv sync --frozen``). Each tree serves its Procfile's ``web`` line (2
workers) and its ``registry`` line (1 worker), all four on one database of the bench's own,
migrated and seeded: a user with an API token, 50 workspaces, and 8 online ones with an agent
token each (one per client, as each agent beats for its own workspace).

Per round, each block (an endpoint at 1 client and at 8 concurrent clients, ``--requests`` in
all, keep-alive) runs on both trees one after the other; which tree goes first flips every round,
so both pay alike for what else the machine is doing. Per block and tree: p50 and p95 latency,
the servers' CPU per request (utime + stime of the gunicorn master and its workers, from
``/proc``, before and after the block) and PostgreSQL's (the database's backends, from
``pg_stat_activity`` and ``/proc``). Each figure is reported as the ratio this tree / the other,
taken per round: the median and the spread (min - max) over the rounds.

The block of docs/benchmarks.md between this bench's markers is rewritten; ``python -m bench``
keeps it. Everything started is stopped by its pid, the worktree removed and the database
dropped, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.common import percentile, write_block
from bench.stack import free_port, wait_healthz
from project.supervise import parse_procfile

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
MARKERS = re.compile(
    r"<!-- server_path:(\w+):begin -->.*?<!-- server_path:\1:end -->\n?", re.DOTALL
)
BEGIN, END = "<!-- server_path:web:begin -->", "<!-- server_path:web:end -->"
TREES = ("new", "old")
WORKSPACES = 50
AGENTS = 8  # online workspaces, one per concurrent client
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the pure parts: arguments, schedule, arithmetic ------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench server_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--against", required=True, help="the revision to compare with")
    parser.add_argument("--rounds", type=_positive, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--requests", type=_positive, default=500, help="requests per block (default 500)"
    )
    parser.add_argument(
        "--clients",
        type=_client_counts,
        default=(1, 8),
        help="concurrent clients per block, comma-separated (default 1,8)",
    )
    parser.add_argument(
        "--database", help="the bench's database (default: DATABASE_URL's name + _server_path)"
    )
    parser.add_argument("--out", type=Path, default=DOC, help="the report to update")
    parser.add_argument("--no-report", action="store_true", help="print the figures only")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _client_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(_positive(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not counts:
        raise argparse.ArgumentTypeError("no client count given")
    return counts


def tree_order(round_index: int) -> tuple[str, str]:
    """The trees in the order a round measures them: this one first on even rounds."""
    return TREES if round_index % 2 == 0 else (TREES[1], TREES[0])


def shares(requests: int, clients: int) -> list[int]:
    """``requests`` split over ``clients`` as evenly as whole numbers allow."""
    base, extra = divmod(requests, clients)
    return [base + (1 if index < extra else 0) for index in range(clients)]


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of a figure over the rounds."""
    return statistics.median(values), min(values), max(values)


def ratios(new: list[float], old: list[float]) -> list[float]:
    """Round by round, ``new / old`` (rounds where ``old`` is 0 are left out)."""
    if len(new) != len(old):
        raise ValueError("one value per round and tree")
    return [a / b for a, b in zip(new, old, strict=True) if b]


def stat_cpu_ticks(stat: str) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) from a ``/proc/<pid>/stat`` line (the command's
    name may hold spaces and parentheses: fields are counted after the last ``)``)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


# -- /proc --------------------------------------------------------------------------------------


def _proc_stats() -> dict[int, tuple[int, int]]:
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = stat_cpu_ticks(Path(entry.path, "stat").read_text())
            except (OSError, ValueError):
                continue  # gone meanwhile
    return found


def server_cpu(master: int) -> tuple[float, frozenset[int]]:
    """CPU seconds of a gunicorn master and its workers, and the workers' pids."""
    stats = _proc_stats()
    workers = frozenset(pid for pid, (ppid, _) in stats.items() if ppid == master)
    ticks = sum(stats[pid][1] for pid in {master, *workers} if pid in stats)
    return ticks / CLOCK_TICKS, workers


def pids_cpu(pids: set[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            found[pid] = stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())[1] / CLOCK_TICKS
    return found


# -- the trees and their servers -------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


@contextlib.contextmanager
def worktree(revision: str, folder: Path) -> Iterator[Path]:
    """``revision`` checked out in ``folder`` with its own venv; removed at the end."""
    path = folder / "tree"
    _git("worktree", "add", "--detach", str(path), revision)
    try:
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        subprocess.run(
            ["uv", "sync", "--frozen", "--quiet", "--python", python], cwd=path, env=env, check=True
        )
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)


@dataclass
class Server:
    tree: str
    listener: str  # "web" or "registry"
    port: int
    proc: subprocess.Popen[bytes]


def _start(tree: str, root: Path, listener: str, env: dict[str, str], logs: Path) -> Server:
    line = dict(parse_procfile((root / "Procfile").read_text()))[listener]
    port = free_port()
    bind = {"BIND": f"127.0.0.1:{port}"} if listener == "web" else {}
    if listener == "registry":
        bind = {"REGISTRY_BIND": f"127.0.0.1:{port}"}
    log = open(logs / f"{tree}-{listener}.log", "ab")  # noqa: SIM115 - as long as the process
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"exec {line}"],
        cwd=root,
        env={**env, **bind},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(tree, listener, port, proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def servers(
    roots: dict[str, Path], database_url: str, folder: Path
) -> Iterator[dict[tuple[str, str], Server]]:
    """Both trees' web (2 workers) and registry (1 worker) processes, as their Procfiles run
    them, on the same database and Redis; stopped by their pids at the end."""
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DATABASE_POOL")}
    started: dict[tuple[str, str], Server] = {}
    try:
        for tree, root in roots.items():
            run_dir = folder / f"run-{tree}"
            (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
            env = {
                **base,
                "DJANGO_SETTINGS_MODULE": "project.settings",
                "DATABASE_URL": database_url,
                "WEB_CONCURRENCY": "2",
                "REGISTRY_CONCURRENCY": "1",
                "RUN_DIR": str(run_dir),
                "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics"),
                "READYZ_REQUIRE_WORKERS": "false",
            }
            for listener in ("web", "registry"):
                started[(tree, listener)] = _start(tree, root, listener, env, folder)
        for server in started.values():
            wait_healthz(server.port, timeout=90)
        yield started
    finally:
        for server in started.values():
            _stop(server.proc)


# -- the database --------------------------------------------------------------------------------


def bench_database_url(name: str | None) -> str:
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/workspaces")
    url = urlsplit(base)
    database = name or f"{url.path.lstrip('/') or 'workspaces'}_server_path"
    return urlunsplit(url._replace(path=f"/{database}"))


@dataclass
class Seed:
    token: str
    workspaces: list[str]
    agents: list[tuple[str, str]]  # (workspace id, agent token)


def seed() -> Seed:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from bench.common import shell_rows
    from workspaces import services

    user, _ = get_user_model().objects.get_or_create(username="bench-server-path")
    rows = shell_rows(user, [f"bench-{index}" for index in range(WORKSPACES)], handled_seq=1)
    online = shell_rows(
        user,
        [f"agent-{index}" for index in range(AGENTS)],
        ("online",),
        generation=1,
        handled_seq=1,
        is_running=True,
        last_started_at=timezone.now(),
    )
    agents = [(str(row.id), services.issue_agent_token(row.id, 1)) for row in online]
    return Seed(services.issue_api_token(user), [str(row.id) for row in rows], agents)


def drop_database(database_url: str) -> None:
    import psycopg2
    from django.db import connections

    connections.close_all()
    url = urlsplit(database_url)
    conn = psycopg2.connect(
        dbname="postgres", user=url.username or "postgres", host=url.hostname, port=url.port
    )
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{url.path.lstrip("/")}" WITH (FORCE)')
    conn.close()


def backends(database: str) -> set[int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        )
        return {int(row[0]) for row in cursor.fetchall()}


# -- the load ------------------------------------------------------------------------------------

Request = tuple[str, str, dict[str, str], bytes | None]


@dataclass(frozen=True)
class Endpoint:
    name: str
    listener: str
    build: Callable[[int, int], Request]  # (client, sequence) -> the request


def endpoints(data: Seed) -> list[Endpoint]:
    user = {"Authorization": f"Token {data.token}"}
    as_json = {**user, "Content-Type": "application/json"}
    sample = data.workspaces[WORKSPACES // 2]

    def beat(client: int, _: int) -> Request:
        workspace, token = data.agents[client % AGENTS]
        body = json.dumps({"workspace_id": workspace, "healthy": True}).encode()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        return "POST", "/api/registry/heartbeat", headers, body

    def patch(client: int, sequence: int) -> Request:
        # Each client writes its own row, as users change their own workspaces.
        body = json.dumps({"env": {"BENCH": str(sequence)}}).encode()
        return "PATCH", f"/api/workspaces/{data.workspaces[client]}/", as_json, body

    return [
        Endpoint("GET /healthz", "web", lambda c, s: ("GET", "/healthz", {}, None)),
        Endpoint(
            "GET /api/workspaces/", "web", lambda c, s: ("GET", "/api/workspaces/", user, None)
        ),
        Endpoint(
            "GET /api/workspaces/{id}/",
            "web",
            lambda c, s: ("GET", f"/api/workspaces/{sample}/", user, None),
        ),
        Endpoint("PATCH /api/workspaces/{id}/ (env)", "web", patch),
        Endpoint("POST /api/registry/heartbeat", "registry", beat),
    ]


def drive(port: int, endpoint: Endpoint, requests: int, clients: int) -> list[float]:
    """Seconds per request: ``requests`` in all from ``clients`` threads, each on its own
    keep-alive connection, started together. Any answer but 200 fails the run."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients)

    def client(index: int, count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        samples = latencies[index]
        try:
            start.wait()
            for sequence in range(count):
                method, path, headers, body = endpoint.build(index, sequence)
                began = time.perf_counter()
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                samples.append(time.perf_counter() - began)
                if response.status != 200:
                    errors.append(f"{method} {path}: {response.status} {answer[:200]!r}")
                    return
        except Exception as exc:  # reported below, with the others
            errors.append(f"{endpoint.name}: {exc!r}")
            start.abort()
        finally:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(index, count))
        for index, count in enumerate(shares(requests, clients))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(errors[0])
    return [sample for samples in latencies for sample in samples]


@dataclass
class Block:
    """One endpoint at one client count on one tree, a value per round."""

    p50: list[float] = field(default_factory=list)  # ms
    p95: list[float] = field(default_factory=list)  # ms
    cpu: list[float] = field(default_factory=list)  # server ms per request
    pg: list[float] = field(default_factory=list)  # PostgreSQL ms per request


def measure(
    server: Server, endpoint: Endpoint, requests: int, clients: int, database: str, into: Block
) -> None:
    cpu_before, workers = server_cpu(server.proc.pid)
    pg_before = pids_cpu(backends(database))
    samples = drive(server.port, endpoint, requests, clients)
    cpu_after, workers_after = server_cpu(server.proc.pid)
    pg_after = pids_cpu(backends(database))
    if workers != workers_after:
        raise RuntimeError(f"{server.tree} {server.listener}: a worker was replaced mid-block")
    # A backend that began within the block counts whole; one that ended within it is lost
    # (the pool keeps its connections: none ends on either tree, see the report's counts).
    pg = sum(after - pg_before.get(pid, 0.0) for pid, after in pg_after.items())
    into.p50.append(percentile(samples, 0.5) * 1000)
    into.p95.append(percentile(samples, 0.95) * 1000)
    into.cpu.append((cpu_after - cpu_before) * 1000 / len(samples))
    into.pg.append(pg * 1000 / len(samples))


# -- the report ----------------------------------------------------------------------------------

Results = dict[tuple[str, int, str], Block]  # (endpoint, clients, tree) -> its rounds


def _cell(new: list[float], old: list[float]) -> str:
    values = ratios(new, old)
    if not values:
        return "-"
    middle, low, high = spread(values)
    return f"**{middle:.2f}** ({low:.2f}-{high:.2f})"


def table(results: Results, names: list[str], clients: tuple[int, ...]) -> list[str]:
    lines = [
        "| endpoint | clients | p50 ms new / old | p50 ratio | p95 ms new / old | p95 ratio "
        "| server CPU ms/req new / old | ratio | PostgreSQL CPU ms/req new / old | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for count in clients:
            new, old = results[(name, count, "new")], results[(name, count, "old")]
            cells = [name, str(count)]
            for attr in ("p50", "p95", "cpu", "pg"):
                a, b = getattr(new, attr), getattr(old, attr)
                cells.append(f"{statistics.median(a):.3g} / {statistics.median(b):.3g}")
                cells.append(_cell(a, b))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The figures' table and the run's description lines."""
    database_url = bench_database_url(args.database)
    database = urlsplit(database_url).path.lstrip("/")
    os.environ["DATABASE_URL"] = database_url
    from bench.common import setup_django

    new_rev = _git("rev-parse", "--short", "HEAD")
    old_rev = _git("rev-parse", "--short", args.against)
    started = time.time()
    load_before = _load()
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-path-") as tmp:
        folder = Path(tmp)
        try:
            setup_django(database)
            data = seed()
            points = endpoints(data)
            with worktree(args.against, folder) as old_root:
                roots = {"new": REPO, "old": old_root}
                with servers(roots, database_url, folder) as running:
                    for endpoint in points:  # warm up: imports, pools, caches
                        for tree in TREES:
                            server = running[(tree, endpoint.listener)]
                            drive(server.port, endpoint, 200, max(args.clients))
                    held = len(backends(database))
                    for round_index in range(args.rounds):
                        print(f"round {round_index + 1}/{args.rounds}", flush=True)
                        for endpoint in points:
                            for count in args.clients:
                                for tree in tree_order(round_index):
                                    block = results.setdefault(
                                        (endpoint.name, count, tree), Block()
                                    )
                                    measure(
                                        running[(tree, endpoint.listener)],
                                        endpoint,
                                        args.requests,
                                        count,
                                        database,
                                        block,
                                    )
                    held_after = len(backends(database))
        finally:
            drop_database(database_url)
    names = [endpoint.name for endpoint in points]
    lines = table(results, names, args.clients)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    about = [
        f"Made by `python -m bench server_path --against {args.against}` on {when} in "
        f"{time.time() - started:.0f} s: new = this tree ({new_rev}), old = {old_rev}. "
        f"{args.rounds} round{'s' if args.rounds > 1 else ''}; per round, endpoint and client "
        f"count, {args.requests} requests "
        "on each tree (keep-alive, the clients' share each), the tree that goes first flipping "
        "every round. Ratios are new / old, taken per round: the median, and (min-max) over "
        "the rounds; the absolute figures are the medians over the rounds.",
        "",
        f"- load average {load_before} at the start, {_load()} at the end "
        f"({os.cpu_count()} cores, shared with other work)",
        f"- PostgreSQL backends on the bench database (both trees' four servers): {held} "
        f"after the warm-up, {held_after} at the end",
    ]
    return lines, about


HOW = [
    "`python -m bench server_path --against REV` serves this tree and revision REV side by side, "
    "in one run. REV is checked out in a temporary git worktree with a venv of its own "
    "(`uv sync --frozen`); each tree serves its Procfile's `web` line (2 workers) and its "
    "`registry` line (1 worker), all four on one bench database, migrated and seeded (a user "
    "with an API token, 50 workspaces, 8 online ones with an agent token each: each client "
    "beats and writes for its own workspace).",
    "Per round, each block (an endpoint at 1 and at 8 concurrent clients, keep-alive) runs on "
    "both trees one after the other, and which tree goes first flips every round. Per block and "
    "tree: p50 and p95 latency; the server's CPU per request (utime + stime of the gunicorn "
    "master and its workers, from `/proc`, before and after the block); PostgreSQL's CPU per "
    "request (the bench database's backends, from `pg_stat_activity` and `/proc`; a backend "
    "that both began and ended within a block would be missed, hence the backend counts below).",
]


def section(about: list[str], lines: list[str]) -> list[str]:
    """The report's block: how the figures are made, this run's description, the table."""
    prose = [line for text in [*HOW, about[0]] for line in [*textwrap.wrap(text, 100), ""]]
    items = [textwrap.wrap(item, 100, subsequent_indent="  ") for item in about[1:] if item]
    return [
        "## The web server's path",
        "",
        *prose,
        *[line for item in items for line in item],
        "",
        *lines,
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines, about = run(args)
    print("\n".join([*about, "", *lines]))
    if not args.no_report:
        write_block(args.out, BEGIN, END, section(about, lines))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
