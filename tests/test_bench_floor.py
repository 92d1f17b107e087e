"""The steady bench's floor: N of the agent's own page servers with no platform. They run the
agent's code, so a change to the agent that the floor's program does not follow fails here, not
in a long benchmark run. Its options are checked before anything starts."""

from __future__ import annotations

import os
import urllib.request

import pytest

from bench.steady import floor_servers, main
from provisioning.agent import AGENT_PAGE, AGENT_SCRIPT
from tests.support import free_port


def test_the_floor_serves_the_agents_page_and_stops_by_pid() -> None:
    ports = [free_port(), free_port()]
    with floor_servers(2, ports, AGENT_SCRIPT.parent) as pids:
        assert len(pids) == 2
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                assert answer.status == 200
                assert answer.read() == AGENT_PAGE.read_bytes()
        with open(f"/proc/{pids[0]}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        assert argv[1:3] == [b"-I", b"-S"]  # the agent's interpreter flags
    for pid in pids:  # stopped and reaped
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("argv", [["--silenced", "0"], ["--workspaces", "3", "--silenced", "4"]])
def test_the_bench_refuses_a_run_without_offline_detection(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything starts, naming the option (it once failed at the end of a run)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "--silenced must be between 1 and --workspaces" in capsys.readouterr().err
