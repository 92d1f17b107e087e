"""bin/services, how bin/run and .ci/run get PostgreSQL and Redis, against real servers: where
nothing answers on a local URL it starts the project's own in RUN_DIR and stops exactly those;
a server that already answers is used as it is and never stopped; a remote URL where nothing
answers is an error naming it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from django.conf import settings

from tests.support import wait_for

SERVICES = Path(__file__).resolve().parents[2] / "bin" / "services"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _services(
    command: str, services_dir: Path, pg_port: int, redis_port: int, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SERVICES), command],
        env={
            **os.environ,
            "RUN_DIR": str(services_dir),
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{pg_port}/postgres",
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _postgres_answers(port: int, dbname: str = "postgres") -> bool:
    try:
        conn = psycopg2.connect(
            host="127.0.0.1", port=port, user="postgres", dbname=dbname, connect_timeout=3
        )
    except psycopg2.OperationalError:
        return False
    with conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        ok = cursor.fetchone() == (1,)
    conn.close()
    return ok


def _redis_answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=3).ping())
    except redis.ConnectionError:
        return False


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: present in /proc and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _clean(folder: Path) -> None:
    """Stops what bin/services left running in ``folder`` and removes a cluster kept outside it."""
    _services("stop", folder, 1, 1)
    link = folder / "postgres"
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)


@pytest.fixture(params=["reachable", "closed"])
def services_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A RUN_DIR the postgres user can enter ("reachable", as /work/<checkout>/var) or one
    under a folder only root enters ("closed", as a checkout in /root: the cluster then lives in
    the postgres user's home; for root only). Yields the folder and whether it is "closed".
    Whatever is left running is stopped, by bin/services, afterwards."""
    if request.param == "reachable":
        parent = Path(tempfile.mkdtemp(prefix="services-"))
        parent.chmod(0o755)
    else:
        parent = tmp_path / "closed"
        parent.mkdir(mode=0o700)
    folder = parent / "var"
    yield folder, request.param == "closed" and os.getuid() == 0
    _clean(folder)
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.slow
def test_starts_its_own_postgres_and_redis_and_stops_exactly_those(
    services_dir: tuple[Path, bool],
) -> None:
    folder, closed = services_dir
    pg_port, redis_port = _free_port(), _free_port()
    assert not _postgres_answers(pg_port) and not _redis_answers(redis_port)

    started = _services("start", folder, pg_port, redis_port)
    assert started.returncode == 0, started.stderr
    assert "started PostgreSQL" in started.stdout and "started Redis" in started.stdout
    assert _postgres_answers(pg_port)
    assert _redis_answers(redis_port)

    cluster = (folder / "postgres").resolve()
    assert cluster.is_relative_to("/var/lib/postgresql") == closed
    postmaster = int((cluster / "data" / "postmaster.pid").read_text().split()[0])
    redis_pid = int((folder / "redis" / "redis.pid").read_text())
    # Their own sessions: a Ctrl-C to bin/run's terminal reaches supervisord, not them, so they
    # stop after the programs that use them.
    assert os.getsid(postmaster) not in (os.getsid(0), os.getsid(redis_pid))
    assert os.getsid(redis_pid) != os.getsid(0)

    # A second start finds them answering and keeps them; the data outlives a stop.
    conn = psycopg2.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE kept")
    conn.close()
    again = _services("start", folder, pg_port, redis_port)
    assert again.returncode == 0 and "this folder's PostgreSQL" in again.stdout, again.stdout
    processes = {postmaster, redis_pid, *_children(postmaster)}
    assert len(processes) > 3  # the postmaster's checkpointer, writers, launchers

    stopped = _services("stop", folder, pg_port, redis_port)
    assert stopped.returncode == 0, stopped.stderr
    assert [pid for pid in processes if _running(pid)] == []
    assert not _postgres_answers(pg_port) and not _redis_answers(redis_port)

    restarted = _services("start", folder, pg_port, redis_port)
    assert restarted.returncode == 0, restarted.stderr
    assert _postgres_answers(pg_port, dbname="kept")
    assert _services("stop", folder, pg_port, redis_port).returncode == 0
    assert not _postgres_answers(pg_port) and not _redis_answers(redis_port)


@pytest.mark.slow
def test_a_server_that_answers_is_used_as_it_is_and_never_stopped(tmp_path: Path) -> None:
    db = settings.DATABASES["default"]
    pg_url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/x"
    redis_port = _free_port()
    folder = tmp_path / "var"
    foreign = subprocess.Popen(
        [
            "redis-server",
            *("--port", str(redis_port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _redis_answers(redis_port), timeout=10, message="the foreign Redis")
        pg_started = _postmaster_start(db)
        env = {"DATABASE_URL": pg_url}

        started = _services("start", folder, 0, redis_port, **env)
        assert started.returncode == 0, started.stderr
        assert started.stdout.count("used as it is, never stopped here") == 2, started.stdout
        assert not (folder / "postgres").exists() and not (folder / "redis").exists()

        # Pidfiles left by a killed run whose pid is now another process's: not a server of ours.
        (folder / "redis").mkdir()
        (folder / "redis" / "redis.pid").write_text(f"{foreign.pid}\n")
        (folder / "postgres" / "data").mkdir(parents=True)
        (folder / "postgres" / "data" / "postmaster.pid").write_text(f"{foreign.pid}\n")
        stopped = _services("stop", folder, 0, redis_port, **env)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" not in stopped.stdout
        assert foreign.poll() is None and _redis_answers(redis_port)
        assert _postmaster_start(db) == pg_started
    finally:
        _clean(folder)
        foreign.terminate()
        foreign.wait(timeout=30)


def _postmaster_start(db: dict[str, Any]) -> str:
    conn = psycopg2.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        dbname="postgres",
    )
    with conn, conn.cursor() as cursor:
        cursor.execute("SELECT pg_postmaster_start_time()::text")
        row = cursor.fetchone()
    conn.close()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL"])
def test_a_remote_url_where_nothing_answers_is_an_error_naming_it(
    variable: str, tmp_path: Path
) -> None:
    # 127.0.0.2 is this machine's loopback too, but not a host bin/services starts servers on.
    scheme = "postgres" if variable == "DATABASE_URL" else "redis"
    url = f"{scheme}://user:s3cret@127.0.0.2:{_free_port()}/x"
    folder = tmp_path / "var"
    result = _services("start", folder, 1, 1, **{variable: url})
    _clean(folder)
    assert result.returncode == 1
    assert f"{variable}={scheme}://user:***@127.0.0.2" in result.stderr, result.stderr
    assert "nothing answers" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert not (folder / "postgres").exists() and not (folder / "redis").exists()
