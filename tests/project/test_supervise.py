"""bin/run's supervisor: a real supervisord from the generated config restarts the process that
died and leaves the others running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from project.supervise import STOPWAITSECS, parse_procfile, render
from tests.support import wait_for

BIN = Path(sys.executable).parent


def test_parse_procfile_one_program_per_line() -> None:
    text = "# comment\n\nweb: gunicorn x --bind ${BIND:-127.0.0.1:8000}\nworker: celery worker\n"
    assert parse_procfile(text) == [
        ("web", "gunicorn x --bind ${BIND:-127.0.0.1:8000}"),
        ("worker", "celery worker"),
    ]
    with pytest.raises(ValueError, match="line 1"):
        parse_procfile("not a process line\n")
    with pytest.raises(ValueError, match="twice"):
        parse_procfile("a: x\na: y\n")


def test_the_shipped_procfile_renders_a_program_each() -> None:
    procfile = Path(__file__).resolve().parents[2] / "Procfile"
    programs = parse_procfile(procfile.read_text())
    config = render(programs, directory=procfile.parent, run_dir=Path("/tmp"))
    for name, _ in programs:
        assert f"[program:{name}]" in config
    assert config.count("autorestart=true") == len(programs)


def _running(conf: Path) -> dict[str, int]:
    """The pid of each program in state RUNNING (up for STARTSECS), from ``supervisorctl``."""
    lines = subprocess.run(
        [BIN / "supervisorctl", "-c", str(conf), "status"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    found = {}
    for line in lines:
        match = re.match(r"^(\S+)\s+RUNNING\s+pid (\d+),", line)
        if match:
            found[match[1]] = int(match[2])
    return found


def test_a_crashed_process_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    conf = tmp_path / "supervisord.conf"
    programs = parse_procfile("a: sleep ${NAP:-300}\nb: sleep 300\n")
    conf.write_text(render(programs, directory=tmp_path, run_dir=tmp_path))
    proc = subprocess.Popen(
        [BIN / "supervisord", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        first = wait_for(
            lambda: (pids := _running(conf)) and len(pids) == 2 and pids,
            timeout=30,
            message="both programs running",
        )
        os.kill(first["a"], signal.SIGKILL)
        after = wait_for(
            lambda: (
                (pids := _running(conf)) and len(pids) == 2 and pids["a"] != first["a"] and pids
            ),
            timeout=30,
            message="program a restarted",
        )
        assert after["b"] == first["b"]  # the other program never stopped
        assert proc.poll() is None  # nor did the supervisor
    finally:
        # Stopped only once every program is RUNNING: supervisord signals a program's process
        # group, which a program spawned a moment before may not have made yet; that signal is
        # lost and supervisord waits STOPWAITSECS before its SIGKILL.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOPWAITSECS + 30)
