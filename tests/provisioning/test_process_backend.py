"""The process backend with real processes (the agent script, real signals, real /proc)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning.backends import process_launch
from provisioning.backends.base import CONFIG_MARKER, BackendError, ConfigState, LaunchSpec
from provisioning.backends.process import ProcessBackend
from provisioning.backends.process_launch import alive
from tests.support import next_backend_uid, wait_for
from workspaces.manifests import Template


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ProcessBackend]:
    # Workspace uids must be able to enter the data folder (pytest's own temporary folders are
    # closed to other users), as in a deployment.
    data = Path(tempfile.mkdtemp(prefix="ws-backend-test-"))
    data.chmod(0o755)
    backend = ProcessBackend(data)
    yield backend
    for info in backend.list_instances():
        backend.stop(uuid.UUID(info.workspace_id), {}, grace_seconds=0.2)
    shutil.rmtree(data, ignore_errors=True)


def _spec(tmp_path: Path, command: tuple[str, ...] | None = None, **env: str) -> LaunchSpec:
    template = Template(name="t", path=tmp_path, runtime="shell", command=command)
    workspace_id = uuid.uuid4()
    return LaunchSpec(
        workspace_id,
        1,
        template,
        {"WORKSPACE_ID": str(workspace_id), "WORKSPACE_TOKEN": "tok", **env},
        uid=next_backend_uid(),
    )


SLEEPER = ("{python}", "-c", "import time; time.sleep(600)")
# Survives SIGTERM, saying so: only SIGKILL ends it. Says "ready" once its handler is in place.
STUBBORN = (
    "{python}",
    "-c",
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: print('TERM ignored', flush=True))\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(600)",
)


def _log_of(backend: ProcessBackend, spec: LaunchSpec) -> str:
    path = backend.root / str(spec.workspace_id) / "agent.log"
    return path.read_text() if path.exists() else ""


def test_start_runs_a_detached_process_with_the_env(backend, tmp_path) -> None:
    spec = _spec(tmp_path, SLEEPER, GREETING="hello")
    state = backend.start(spec, {})
    assert alive(state["pid"], state["start_time"])
    assert os.getpgid(state["pid"]) == state["pid"]  # its own session and group
    assert os.getppid() != state["pid"]

    def read_environ() -> list[bytes]:
        # Read as soon as start returns, the launch chain may still be between two execs (an
        # empty environ); the instance's own environment follows within moments.
        with open(f"/proc/{state['pid']}/environ", "rb") as handle:
            return [item for item in handle.read().split(b"\0") if item]

    environ = wait_for(read_environ, timeout=10, message="the instance's environment")
    assert b"GREETING=hello" in environ
    assert b"WORKSPACE_TOKEN=tok" in environ
    # The secret env is not on the command line.
    with open(f"/proc/{state['pid']}/cmdline", "rb") as handle:
        assert b"tok" not in handle.read()
    assert backend.status(spec.workspace_id, state).running


def test_start_replaces_an_earlier_instance_never_duplicates(backend, tmp_path) -> None:
    spec = _spec(tmp_path, SLEEPER)
    first = backend.start(spec, {})
    second = backend.start(spec, {})  # e.g. a re-run of a cycle whose worker was killed
    assert not alive(first["pid"], first["start_time"])
    assert alive(second["pid"], second["start_time"])
    assert [info.running for info in backend.list_instances()] == [True]


def test_stop_sends_sigterm_then_sigkill_after_the_grace(backend, tmp_path) -> None:
    spec = _spec(tmp_path, STUBBORN)
    state = backend.start(spec, {})
    wait_for(lambda: "ready" in _log_of(backend, spec), timeout=30, message="its TERM handler")
    started = time.monotonic()
    assert backend.stop(spec.workspace_id, state, grace_seconds=0.5) == {}
    assert time.monotonic() - started >= 0.5  # a lower bound: the grace was given in full
    assert "TERM ignored" in _log_of(backend, spec)  # SIGTERM came first and was survived ...
    assert not alive(state["pid"], state["start_time"])  # ... so SIGKILL ended it
    assert not backend.status(spec.workspace_id, state).running


def test_stop_of_nothing_is_a_no_op(backend, tmp_path) -> None:
    assert backend.stop(uuid.uuid4(), {}, grace_seconds=0.1) == {}
    assert backend.stop(uuid.uuid4(), {"pid": 999_999_999, "start_time": 1}, 0.1) == {}


def test_a_new_backend_object_adopts_the_running_process(backend, tmp_path) -> None:
    """Survives a worker restart: a fresh backend finds the process by its pid file."""
    spec = _spec(tmp_path, SLEEPER)
    state = backend.start(spec, {})
    fresh = ProcessBackend(backend.root)
    assert fresh.status(spec.workspace_id, {}).running
    fresh.stop(spec.workspace_id, {}, grace_seconds=1)
    assert not alive(state["pid"], state["start_time"])


def test_a_recycled_pid_is_not_mistaken_for_the_instance(backend, tmp_path) -> None:
    spec = _spec(tmp_path, SLEEPER)
    state = backend.start(spec, {})
    lying = {"pid": state["pid"], "start_time": state["start_time"] - 1}
    assert not alive(lying["pid"], lying["start_time"])
    os.killpg(state["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(state["pid"], state["start_time"]), timeout=5)
    assert not backend.status(spec.workspace_id, state).running


def test_config_marker_and_files(backend, tmp_path) -> None:
    spec = _spec(tmp_path)
    state = backend.prepare(spec, {})
    assert backend.config_state(spec, state) is ConfigState.EMPTY
    backend.write_config(spec, state, {"a.txt": b"A", "nested/b.txt": b"B"})
    configs = backend.root / str(spec.workspace_id) / "configs"
    assert (configs / "nested" / "b.txt").read_bytes() == b"B"
    assert (configs / CONFIG_MARKER).is_file()
    assert backend.config_state(spec, state) is ConfigState.PROVISIONED


def test_template_files_cannot_escape_the_config_folder(backend, tmp_path) -> None:
    from provisioning.backends.base import BackendError

    spec = _spec(tmp_path)
    state = backend.prepare(spec, {})
    with pytest.raises(BackendError):
        backend.write_config(spec, state, {"../../escape.txt": b"x"})


def test_remove_stops_and_deletes_everything(backend, tmp_path) -> None:
    spec = _spec(tmp_path, SLEEPER)
    state = backend.prepare(spec, {})
    backend.write_config(spec, state, {"a": b"1"})
    state = backend.start(spec, state)
    backend.remove(spec.workspace_id, state)
    assert not alive(state["pid"], state["start_time"])
    assert not (backend.root / str(spec.workspace_id)).exists()
    backend.remove(spec.workspace_id, state)  # not found means done


def test_the_agent_exits_cleanly_on_sigterm(backend, tmp_path) -> None:
    # No platform is listening: the agent keeps retrying registration until told to stop.
    spec = _spec(tmp_path, None, PLATFORM_URL="http://127.0.0.1:9", PYTHONPATH="/nowhere")
    state = backend.start(spec, {})
    # Its handler is installed before its first registration attempt.
    wait_for(
        lambda: "registration not accepted yet" in _log_of(backend, spec),
        timeout=30,
        message="the agent's first registration attempt",
    )
    # The agent's interpreter is isolated (-I: no PYTHON* variables of the workspace, no user
    # site-packages) and loads no site (-S): the standard library is all it needs.
    argv = Path(f"/proc/{state['pid']}/cmdline").read_bytes().split(b"\0")[:-1]
    assert argv[1:3] == [b"-I", b"-S"] and argv[3].endswith(b"workspace_agent.py"), argv
    assert b"PYTHONPATH=/nowhere" in Path(f"/proc/{state['pid']}/environ").read_bytes()
    backend.stop(spec.workspace_id, state, grace_seconds=30)
    assert not alive(state["pid"], state["start_time"])
    assert "SIGTERM received" in _log_of(backend, spec)


def test_logs_tail_the_output_file_and_stay_bounded(tmp_path) -> None:
    backend = ProcessBackend(tmp_path)
    workspace_id = uuid.uuid4()
    assert backend.logs(workspace_id, {}, 10, 4096) == ""  # no instance, no file
    folder = tmp_path / str(workspace_id)
    folder.mkdir()
    lines = [f"line {n} " + "x" * 50 for n in range(10_000)]
    (folder / "agent.log").write_text("\n".join(lines) + "\n")
    assert backend.logs(workspace_id, {}, 3, 64 * 1024).splitlines() == lines[-3:]
    # max_bytes bounds what is read, whatever the tail asked for.
    bounded = backend.logs(workspace_id, {}, 10_000, 4096)
    assert len(bounded.encode()) <= 4096
    assert bounded.splitlines()[-1] == lines[-1]
    assert backend.logs(workspace_id, {}, 0, 4096) == ""


def _uid_pids(uid: int) -> list[int]:
    from provisioning.backends.process_launch import uid_processes

    return uid_processes(uid)


def test_the_instance_runs_dropped_with_exactly_its_env(backend, tmp_path) -> None:
    spec = _spec(tmp_path, SLEEPER, GREETING="hello")
    state = backend.start(spec, {})
    # setpriv sets no_new_privs, as the uid, then execs the program: wait for the program.
    wait_for(
        lambda: "setpriv" not in os.readlink(f"/proc/{state['pid']}/exe"),
        timeout=10,
        message="the exec",
    )
    status = Path(f"/proc/{state['pid']}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split() == [str(spec.uid)] * 4
    assert fields["Gid"].split() == [str(spec.uid)] * 4
    assert fields["Groups"].strip() == ""
    assert fields["NoNewPrivs"].strip() == "1"
    # Its own mount namespace, where the hidden folders are an empty tmpfs, and its own
    # network namespace.
    assert os.readlink(f"/proc/{state['pid']}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{state['pid']}/ns/net") != os.readlink("/proc/self/ns/net")
    with open(f"/proc/{state['pid']}/environ", "rb") as handle:
        names = {item.split(b"=", 1)[0].decode() for item in handle.read().split(b"\0") if item}
    # The platform's address as the workspace reaches it: the host end of its link.
    wanted = {"PATH", "PYTHONUNBUFFERED", "HOME", "WORKSPACE_CONFIG_DIR", "PLATFORM_URL"}
    wanted |= set(spec.env)
    assert names == wanted  # nothing of the launch's own (PWD, the worker's variables)
    assert state["monitor_pid"] == os.getppid() or alive(state["monitor_pid"], None)


def test_a_command_that_does_not_exist_fails_the_start_saying_so(backend, tmp_path) -> None:
    spec = _spec(tmp_path, ("no-such-program-here",))
    with pytest.raises(BackendError, match="no-such-program-here"):
        backend.start(spec, {})


def test_stop_kills_a_process_the_uid_daemonized_in_a_session_of_its_own(backend, tmp_path) -> None:
    spec = _spec(tmp_path, SLEEPER)
    uid = spec.uid
    assert uid is not None
    state = backend.start(spec, {})
    # Outside the instance's process group and session: only a kill of the whole uid reaches it.
    daemon = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "setsid",
            "sleep",
            "600",
        ],  # not a group leader: setsid makes a session in place, the pid stays
    )
    wait_for(lambda: daemon.pid in _uid_pids(uid), timeout=10, message="the daemon")
    backend.stop(spec.workspace_id, state, grace_seconds=0.5)
    assert daemon.wait(timeout=10) == -signal.SIGKILL
    assert not alive(state["pid"], state["start_time"])
    assert _uid_pids(uid) == []


def test_kill_uid_kills_every_process_of_the_uid_without_walking_proc() -> None:
    uid = next_backend_uid()
    sleepers = [
        subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "600"],
            start_new_session=True,
        )
        for _ in range(3)
    ]
    wait_for(lambda: len(_uid_pids(uid)) == 3, timeout=10, message="the sleepers")
    # The sleepers' zombies go as this test reaps them; the child's count sees them until then.
    reaped = threading.Thread(target=lambda: [sleeper.wait() for sleeper in sleepers])
    reaped.start()
    assert process_launch.kill_uid(uid, wait_seconds=5.0)
    reaped.join(timeout=10)
    assert [sleeper.returncode for sleeper in sleepers] == [-signal.SIGKILL] * 3
    assert _uid_pids(uid) == []
    # A uid with nothing left is free at once.
    assert process_launch.kill_uid(uid)
