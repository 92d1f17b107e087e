"""``python -m bench``: each module in its own process with its own database; the command fails
only when a benchmark fails to run, never because of a number. No timing is asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from django.conf import settings
from django.db import connection

from bench.__main__ import _module_env
from tests.support import REPO, database_url

pytestmark = pytest.mark.slow  # runs benchmark processes


def _drop(name: str) -> None:
    db = connection.settings_dict
    conn = psycopg2.connect(
        dbname="postgres",
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or None,
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
    )
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    conn.close()


@pytest.fixture
def bench_database() -> Iterator[str]:
    """A base database name for the runner; the gate bench gets ``<name>_gate``, dropped after."""
    base = f"{connection.settings_dict['NAME']}_runner"
    yield base
    _drop(f"{base}_gate")


def _run(tmp_path: Path, database_url_value: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "report.md"
    env = {
        **os.environ,
        "DATABASE_URL": database_url_value,
        "REDIS_URL": settings.REDIS_URL,
        "GATE_KEY_PREFIX": "test-bench-gate",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "gate", "--repeats", "1", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, out


def test_each_module_gets_its_own_database() -> None:
    os.environ["DATABASE_URL"], previous = (
        "postgres://u:p@db.example:5433/bench",
        os.environ.get("DATABASE_URL"),
    )
    try:
        assert _module_env("gate")["DATABASE_URL"] == "postgres://u:p@db.example:5433/bench_gate"
        sweeper = _module_env("sweeper")
        assert sweeper["SWEEPER_BENCH_DATABASE_URL"] == sweeper["DATABASE_URL"]
        assert sweeper["DATABASE_URL"].endswith("/bench_sweeper")
    finally:
        if previous is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = previous


@pytest.mark.django_db
def test_a_run_writes_the_report_and_exits_zero(tmp_path: Path, bench_database: str) -> None:
    url = database_url().rsplit("/", 1)[0] + f"/{bench_database}"
    result, out = _run(tmp_path, url)
    assert result.returncode == 0, result.stdout + result.stderr
    report = out.read_text()
    assert "## gate" in report
    assert "| gate acquire+release (provisioning.gate.hold) |" in report
    assert "Made by `python -m bench --only gate --repeats 1" in report


def test_a_benchmark_that_cannot_run_fails_the_command(tmp_path: Path) -> None:
    # Nothing listens on port 1: the child cannot reach its database.
    result, out = _run(tmp_path, "postgres://postgres@127.0.0.1:1/bench")
    assert result.returncode == 1
    assert "benchmarks that failed to run: gate" in result.stderr
    assert "**failed to run**" in out.read_text()
