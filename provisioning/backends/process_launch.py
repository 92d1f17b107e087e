"""How the process backend starts an instance and frees a uid, at the cost of a few small
programs rather than an interpreter with its libraries per call.

**Launching.** The worker runs util-linux ``setsid --fork`` (which exits at once, so the worker
reaps it and nothing else), then, under uid isolation, ``unshare --mount`` (a private mount
namespace), then ``python -I -S process_monitor.py``: the monitor, a session leader that outlives
the worker. The orders arrive on stdin, NUL-separated, never in argv where ``ps`` would show the
workspace's secrets; the monitor reports the instance as JSON on stdout, or why it could not start
it on stderr. See ``process_monitor`` for what the monitor does.

**Freeing a uid.** ``kill_uid`` forks a child of the worker that takes the workspace's uid (and
gid, no groups) and calls ``kill(-1, SIGKILL)``: the kernel signals exactly the processes that uid
may signal, i.e. those whose real or saved uid is the workspace's, with no walk of ``/proc`` (which
costs more the more processes the host runs). A fork cannot escape it: the kernel refuses a fork
to a process with a pending SIGKILL. The child then counts what is left without looking: with
``RLIMIT_NPROC`` at 2 a process of that uid may fork only while the uid owns no process but
itself (the kernel counts processes per uid, zombies included), so its first fork that succeeds
says the uid is free. It never execs, so it stays non-dumpable and a process of that uid cannot
trace it into lying; one can only kill or stop it, and then (or when zombies of the uid outlast the
short wait) the worker falls back to walking ``/proc`` as root.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

MONITOR = Path(__file__).with_name("process_monitor.py")
# What the root side of a launch runs with: never the workspace's environment.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("setsid", "unshare", "setpriv", "mount")
_tools: dict[str, str] = {}


class LaunchError(Exception):
    pass


def system_program(name: str) -> str | None:
    """The absolute path of ``name`` on ``SYSTEM_PATH`` (found once), not on whatever PATH the
    caller runs with: what the root side runs must not depend on it. None when not installed."""
    if name not in _tools:
        found = shutil.which(name, path=SYSTEM_PATH)
        if found is None:
            return None
        _tools[name] = found
    return _tools[name]


def tool(name: str) -> str:
    """The absolute path of a util-linux program the launch needs (looked up once)."""
    found = system_program(name)
    if found is None:
        raise LaunchError(f"{name} is not installed (util-linux and mount provide it)")
    return found


def missing_tools(isolated: bool) -> list[str]:
    wanted = TOOLS if isolated else ("setsid",)
    missing = []
    for name in wanted:
        try:
            tool(name)
        except LaunchError:
            missing.append(name)
    return missing


def hidden_paths(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """The existing folders and files among ``paths`` (symlinks resolved, once each)."""
    folders, files = [], []
    for path in sorted({os.path.realpath(p) for p in paths}):
        if os.path.isdir(path):
            folders.append(path)
        elif os.path.exists(path):
            files.append(path)
    return folders, files


def orders(
    *,
    uid: int | None,
    generation: int,
    log: str,
    instance_file: str,
    exit_file: str,
    cwd: str,
    hidden: Sequence[str],
    argv: Sequence[str],
    env: Mapping[str, str],
) -> bytes:
    """The monitor's stdin (``process_monitor.main`` reads it in this order)."""
    folders, files = hidden_paths(hidden) if uid is not None else ([], [])
    fields = [
        "" if uid is None else str(uid),
        str(generation),
        log,
        instance_file,
        exit_file,
        cwd,
        tool("setpriv") if uid is not None else "",
        tool("mount") if uid is not None else "",
        str(len(folders)),
        *folders,
        str(len(files)),
        *files,
        str(len(argv)),
        *argv,
        *(f"{key}={value}" for key, value in env.items()),
    ]
    if any("\0" in field for field in fields):
        raise LaunchError("an argument or environment value contains a NUL byte")
    return "\0".join(fields).encode()


def command(isolated: bool, python: str) -> list[str]:
    """The chain the worker runs: ``setsid --fork`` [``unshare --mount``] python monitor."""
    namespace = [tool("unshare"), "--mount", "--propagation", "private", "--"] if isolated else []
    return [tool("setsid"), "--fork", *namespace, python, "-I", "-S", str(MONITOR)]


def kill_uid(uid: int, *, wait_seconds: float = 0.5) -> bool:
    """SIGKILL every process of ``uid`` and wait until none is left (zombies included). True
    when the child saw none left; False when it could not tell (it was killed or stopped, or
    something of the uid, a zombie say, was still there): walk ``/proc`` then."""
    if uid <= 0:
        raise ValueError("only a workspace's uid")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only makes system calls, then _exit
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            # This child and one more: a fork fails while anything else of the uid exists.
            resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
            deadline = time.monotonic() + wait_seconds
            while time.monotonic() < deadline:
                try:
                    probe = os.fork()
                except BlockingIOError:
                    time.sleep(0.002)
                    continue
                if probe == 0:
                    os._exit(0)
                os.waitpid(probe, 0)
                code = 0
                break
        finally:
            os._exit(code)
    return _reap(pid, wait_seconds + 2.0) == 0


def _reap(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None when it did not end by itself within ``timeout`` (then it
    is killed) or ended by a signal."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None
