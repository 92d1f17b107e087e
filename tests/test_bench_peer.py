"""The peer bench measures this platform as ``bin/run`` starts it: the Procfile's own lines, not
lines of the bench's (which once left out beat, the access logs and the worker's gossip, and so
reported a control plane cheaper than the one users run). No timing is asserted here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.peer.here import here_platform
from bench.stack import procfile_commands
from project.supervise import parse_procfile
from tests.support import REPO, database_url

PROCFILE = parse_procfile((REPO / "Procfile").read_text())


def test_the_commands_are_the_procfiles_lines_as_bin_run_runs_them() -> None:
    assert procfile_commands() == {
        name: ["/bin/sh", "-c", f"exec {line}"] for name, line in PROCFILE
    }


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _expanded(line: str, env: dict[str, str]) -> list[str]:
    """The Procfile line's words as the shell expands them in ``env``."""
    printed = subprocess.run(
        ["/bin/sh", "-c", f"printf '%s\\0' {line}"], env=env, capture_output=True, check=True
    ).stdout
    return printed.decode().split("\0")[:-1]


@pytest.mark.slow  # starts the platform's processes
@pytest.mark.django_db(transaction=True)  # the platform reads the token it was given
def test_the_peer_platform_runs_every_procfile_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url())
    with here_platform(tmp_path, "process", redis_pid=os.getpid()) as stack:
        assert set(stack.parts) == {name for name, _ in PROCFILE}
        for name, line in PROCFILE:
            expected = _expanded(line, stack.env)
            assert _argv(stack.parts[name])[-len(expected) + 1 :] == expected[1:], name
        # Its files (Caddy's configuration, beat's schedule, the metrics) are the run's own.
        assert stack.env["RUN_DIR"] == str(tmp_path)
        assert (tmp_path / "caddy.json").exists()
        status, _ = stack.request("GET", "/api/workspaces/")
        assert status == 200
