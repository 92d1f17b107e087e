"""``python -m bench server_path``: the parts that decide what is measured and how it is
reported (its options, the round order, the arithmetic, the requests each client sends), without
starting a server. No timing is asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import _kept_sections
from bench.common import percentile
from bench.server_path import (
    AGENTS,
    BEGIN,
    CLOCK_TICKS,
    END,
    REPO,
    WORKSPACES,
    Block,
    Seed,
    endpoints,
    parse_args,
    ratios,
    section,
    server_cpu,
    shares,
    spread,
    stat_cpu_ticks,
    table,
    tree_order,
)
from project.supervise import parse_procfile


def test_options_and_their_defaults() -> None:
    args = parse_args(["--against", "555cc61"])
    assert (args.against, args.rounds, args.requests, args.clients) == ("555cc61", 5, 500, (1, 8))
    assert not args.no_report
    args = parse_args(
        ["--against", "main~3", "--rounds", "2", "--requests", "40", "--clients", "4"]
    )
    assert (args.against, args.rounds, args.requests, args.clients) == ("main~3", 2, 40, (4,))
    assert parse_args(["--against", "x", "--clients", "1,2,16"]).clients == (1, 2, 16)


@pytest.mark.parametrize(
    "argv",
    [
        [],  # the revision to compare with is required
        ["--against", "x", "--rounds", "0"],
        ["--against", "x", "--requests", "-5"],
        ["--against", "x", "--clients", "0"],
        ["--against", "x", "--clients", "a,b"],
        ["--against", "x", "--clients", ","],
    ],
)
def test_bad_options_are_refused_before_anything_starts(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2


def test_rounds_alternate_which_tree_goes_first() -> None:
    orders = [tree_order(index) for index in range(5)]
    assert orders == [("new", "old"), ("old", "new")] * 2 + [("new", "old")]
    firsts = [order[0] for order in [tree_order(index) for index in range(6)]]
    assert firsts.count("new") == firsts.count("old")


def test_requests_are_split_over_the_clients_whole() -> None:
    assert shares(500, 1) == [500]
    assert shares(500, 8) == [63, 63, 63, 63, 62, 62, 62, 62]
    assert sum(shares(7, 3)) == 7 and max(shares(7, 3)) - min(shares(7, 3)) == 1
    assert shares(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]


def test_ratios_are_taken_round_by_round() -> None:
    # Round by round, not median over median: the second round's slow pair stays a pair.
    assert ratios([2.0, 10.0, 3.0], [1.0, 5.0, 2.0]) == [2.0, 2.0, 1.5]
    assert ratios([1.0, 2.0], [0.0, 4.0]) == [0.5]  # nothing measured on the old tree: left out
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])
    assert spread([2.0, 2.0, 1.5]) == (2.0, 1.5, 2.0)
    assert spread([3.0, 1.0, 2.0, 4.0]) == (2.5, 1.0, 4.0)


def test_percentiles_of_the_latencies() -> None:
    samples = [float(value) for value in range(1, 101)]  # 1..100, shuffled below
    shuffled = samples[::2] + samples[1::2]
    assert percentile(shuffled, 0.5) in (50.0, 51.0)
    assert percentile(shuffled, 0.95) == 95.0
    assert percentile([7.0], 0.95) == 7.0


def test_cpu_is_read_after_the_commands_name() -> None:
    # A name with spaces and a parenthesis must not shift the fields.
    line = "4242 (gunicorn: x) y) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 75 3 4 20 0 1 0"
    assert stat_cpu_ticks(line) == (17, 325)
    ppid, ticks = stat_cpu_ticks(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert ppid == os.getppid() and ticks >= 0


def test_the_table_reports_new_over_old_with_the_spread() -> None:
    results = {
        ("GET /healthz", 1, "new"): Block([2.0, 4.0, 3.0], [4.0] * 3, [1.0] * 3, [0.0] * 3),
        ("GET /healthz", 1, "old"): Block([1.0, 2.0, 2.0], [2.0] * 3, [0.5] * 3, [0.0] * 3),
    }
    header, _, row = table(results, ["GET /healthz"], (1,))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|")) == 10
    assert cells[:4] == ["GET /healthz", "1", "3 / 2", "**2.00** (1.50-2.00)"]
    assert cells[6:8] == ["1 / 0.5", "**2.00** (2.00-2.00)"]
    assert cells[9] == "-"  # no PostgreSQL work on either tree: no ratio


def test_each_client_writes_and_beats_for_its_own_workspace() -> None:
    data = Seed(
        token="t" * 40,
        workspaces=[f"ws-{index}" for index in range(WORKSPACES)],
        agents=[(f"agent-{index}", f"token-{index}") for index in range(AGENTS)],
    )
    points = {endpoint.name: endpoint for endpoint in endpoints(data)}
    assert {endpoint.listener for endpoint in points.values()} == {"web", "registry"}
    patch = points["PATCH /api/workspaces/{id}/ (env)"]
    paths = {patch.build(client, 0)[1] for client in range(AGENTS)}
    assert len(paths) == AGENTS
    method, path, headers, body = patch.build(3, 17)
    assert (method, headers["Authorization"]) == ("PATCH", f"Token {'t' * 40}")
    assert body is not None and json.loads(body) == {"env": {"BENCH": "17"}}
    beat = points["POST /api/registry/heartbeat"]
    for client in range(AGENTS):
        method, path, headers, body = beat.build(client, 0)
        assert (method, path) == ("POST", "/api/registry/heartbeat")
        assert headers["Authorization"] == f"Bearer token-{client}"
        assert body is not None and json.loads(body)["workspace_id"] == f"agent-{client}"


def test_the_procfile_has_the_lines_the_bench_starts() -> None:
    lines = dict(parse_procfile((REPO / "Procfile").read_text()))
    assert "${BIND" in lines["web"] and "${WEB_CONCURRENCY" in lines["web"]
    assert "${REGISTRY_BIND" in lines["registry"] and "${REGISTRY_CONCURRENCY" in lines["registry"]


def test_the_full_run_keeps_this_benchs_block(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    block = f"{BEGIN}\n## The web server's path\n\n| a | b |\n{END}\n"
    report.write_text(f"# Benchmarks\n\n## gate\n\nold figures\n\n{block}")
    assert _kept_sections(report) == [block]


def test_a_servers_cpu_counts_its_workers() -> None:
    # A worker that burns CPU, then waits: its ticks count to its parent's server figure.
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = subprocess.Popen(
        [sys.executable, "-c", burn + "print(1, flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"1\n"
        _, own = stat_cpu_ticks(Path(f"/proc/{os.getpid()}/stat").read_text())
        total, workers = server_cpu(os.getpid())
        assert child.pid in workers
        assert round(total * CLOCK_TICKS) >= own + 20  # the worker's 0.3 s, to a tick's rounding
    finally:
        child.kill()
        child.wait()


def test_the_reports_block_wraps_its_prose_and_keeps_the_table() -> None:
    about = ["Made by " + "word " * 40, "", "- load average " + "1.0 " * 30]
    rows = ["| a | b |", "|---|---|", "| " + "x" * 150 + " | y |"]
    block = section(about, rows)
    assert block[0] == "## The web server's path"
    assert block[-1 - len(rows) : -1] == rows  # the table as measured, however wide
    assert all(len(line) <= 100 for line in block if not line.startswith("|"))
