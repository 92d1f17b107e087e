"""How the process backend starts an instance and frees a uid, at the cost of a few small
programs rather than an interpreter with its libraries per call.

**Launching.** The worker runs util-linux ``setsid --fork`` (which exits at once, so the worker
reaps it and nothing else), then, under uid isolation, ``unshare --mount --net`` (a private mount
namespace and a network namespace of the workspace's own), then ``python -I -S
process_monitor.py``: the monitor, a session leader that outlives the worker. The orders arrive
on stdin, NUL-separated, never in argv where ``ps`` would show the workspace's secrets. With a
network namespace the monitor makes its mounts, reports its pid and waits while the worker wires
the namespace's link (``process_network``), then goes on when told to; it reports the instance as
JSON on stdout, or why it could not start it on stderr. See ``process_monitor`` for what the
monitor does.

**Freeing a uid.** ``kill_uid`` forks a child of the worker that takes the workspace's uid (and
gid, no groups) and calls ``kill(-1, SIGKILL)``: the kernel signals exactly the processes that uid
may signal, i.e. those whose real or saved uid is the workspace's, with no walk of ``/proc`` (which
costs more the more processes the host runs). A fork cannot escape it: the kernel refuses a fork
to a process with a pending SIGKILL. The child then counts what is left without looking: with
``RLIMIT_NPROC`` at 2 a process of that uid may fork only while the uid owns no process but
itself (the kernel counts processes per uid, zombies included), so its first fork that succeeds
says the uid is free. It never execs, so it stays non-dumpable and a process of that uid cannot
trace it into lying; one can only kill or stop it, and then (or when zombies of the uid outlast the
short wait) the worker falls back to walking ``/proc`` as root (``uid_processes``; ``alive`` and
``start_time`` tell a live process from a zombie or a recycled pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MONITOR = Path(__file__).with_name("process_monitor.py")
# What the root side of a launch runs with: never the workspace's environment.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("setsid", "unshare", "setpriv", "mount")
# How long a monitor in a namespace of its own waits for its link: a worker that hangs (stopped,
# say) must not leave a half-made launch holding the uid's namespace for ever.
LINK_WAIT_SECONDS = 30.0
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


def _below(path: str, folders: Iterable[str]) -> bool:
    return any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in folders)


@dataclass(frozen=True)
class MountPlan:
    """What the monitor mounts in the workspace's namespace, in this order: an empty tmpfs over
    each of ``private`` (the workspace's own ``/run``, ``/tmp``, ...), each of ``keep`` bound
    back where it was when it lies below one of them (the workspace's own folder), then the
    ``hidden`` folders and files that are not below one (an empty tmpfs, ``/dev/null``)."""

    private: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    hidden_folders: tuple[str, ...] = ()
    hidden_files: tuple[str, ...] = ()

    @classmethod
    def make(cls, private: Iterable[str], keep: Iterable[str], hidden: Iterable[str]) -> MountPlan:
        """Resolved on this host: symlinks followed (``/var/run`` is ``/run`` on most systems),
        missing folders left out, each once."""
        covered = sorted({os.path.realpath(p) for p in private if os.path.isdir(p)})
        kept = sorted({os.path.realpath(p) for p in keep})
        folders, files = hidden_paths(hidden)
        return cls(
            private=tuple(covered),
            keep=tuple(path for path in kept if _below(path, covered)),
            hidden_folders=tuple(path for path in folders if not _below(path, covered)),
            hidden_files=tuple(path for path in files if not _below(path, covered)),
        )

    def fields(self) -> list[str]:
        return [
            str(len(self.private)),
            *self.private,
            str(len(self.keep)),
            *self.keep,
            str(len(self.hidden_folders)),
            *self.hidden_folders,
            str(len(self.hidden_files)),
            *self.hidden_files,
        ]


def orders(
    *,
    uid: int | None,
    generation: int,
    log: str,
    instance_file: str,
    exit_file: str,
    cwd: str,
    mounts: MountPlan,
    link_wait: float | None,
    argv: Sequence[str],
    env: Mapping[str, str],
) -> bytes:
    """The monitor's stdin (``process_monitor.main`` reads it in this order), its length first
    (what follows it on stdin is the go-ahead of a wired link). ``link_wait``: in a network
    namespace of its own, how long the monitor waits for its link before it gives up."""
    if uid is None:
        mounts, link_wait = MountPlan(), None
    fields = [
        "" if uid is None else str(uid),
        str(generation),
        log,
        instance_file,
        exit_file,
        cwd,
        tool("setpriv") if uid is not None else "",
        tool("mount") if uid is not None else "",
        "" if link_wait is None else f"{link_wait:g}",
        *mounts.fields(),
        str(len(argv)),
        *argv,
        *(f"{key}={value}" for key, value in env.items()),
    ]
    if any("\0" in field for field in fields):
        raise LaunchError("an argument or environment value contains a NUL byte")
    body = "\0".join(fields).encode()
    return b"%d\n" % len(body) + body


def command(isolated: bool, python: str, *, network: bool = False) -> list[str]:
    """The chain the worker runs: ``setsid --fork`` [``unshare --mount`` [``--net``]] python
    monitor."""
    net = ["--net"] if network else []
    namespace = (
        [tool("unshare"), "--mount", *net, "--propagation", "private", "--"] if isolated else []
    )
    return [tool("setsid"), "--fork", *namespace, python, "-I", "-S", str(MONITOR)]


def launch(
    argv: Sequence[str],
    orders: bytes,
    *,
    wire: Callable[[int], None] | None,
    timeout: float,
) -> dict[str, Any]:
    """Run the chain ``argv`` with ``orders`` and return the instance the monitor reports.

    With ``wire`` the monitor first reports its own pid, once its namespaces are made, and waits;
    ``wire(pid)`` gives its network namespace the link, then the monitor is told to go on. When
    ``wire`` raises (or this process dies) the monitor reads the end of its stdin instead, and
    exits without starting anything: its namespace, and the link with it, go away. Raises
    ``LaunchError`` with the monitor's reason, or what ``wire`` raised."""
    deadline = time.monotonic() + timeout
    try:
        chain = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": SYSTEM_PATH},
        )
    except OSError as exc:
        raise LaunchError(str(exc)) from exc
    assert chain.stdin and chain.stdout and chain.stderr
    out, err = bytearray(), bytearray()
    try:
        chain.stdin.write(orders)
        chain.stdin.flush()
        if wire is not None:
            _read(chain, out, err, deadline, until=b"\n")
            if b"\n" not in out:
                raise LaunchError(_reason(err))
            head, _, rest = bytes(out).partition(b"\n")
            out[:] = rest
            wire(int(head))
            chain.stdin.write(b"g")
        chain.stdin.close()
        _read(chain, out, err, deadline, until=None)
    except (OSError, ValueError) as exc:
        raise LaunchError(str(exc)) from exc
    finally:
        with contextlib.suppress(OSError):
            chain.stdin.close()
        chain.stdout.close()
        chain.stderr.close()
        chain.wait()  # setsid's parent, which exits as soon as it forked
    if not out.strip():
        raise LaunchError(_reason(err))
    return dict(json.loads(bytes(out)))


def _reason(err: bytes | bytearray) -> str:
    lines = bytes(err).decode(errors="replace").strip().splitlines()[-1:]
    return " ".join(lines) or "no report"


def _read(
    chain: subprocess.Popen[bytes],
    out: bytearray,
    err: bytearray,
    deadline: float,
    *,
    until: bytes | None,
) -> None:
    """Read the monitor's stdout and stderr into ``out`` and ``err`` until stdout holds ``until``
    or (None) both end. Raises ``LaunchError`` at the deadline."""
    assert chain.stdout and chain.stderr
    open_fds = {chain.stdout.fileno(): out, chain.stderr.fileno(): err}
    while open_fds and not (until is not None and until in out):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LaunchError("the monitor did not report in time")
        ready, _, _ = select.select(list(open_fds), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                open_fds[fd].extend(chunk)
            else:
                del open_fds[fd]
                if fd == chain.stdout.fileno() and until is not None:
                    return


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])


def uid_processes(uid: int) -> list[int]:
    """Every live process whose real uid is ``uid`` (a workspace's, daemonized ones included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        # A zombie is dead already: only its parent's wait() removes it.
        if fields.get("State", "").split()[:1] == ["Z"]:
            continue
        uids = fields.get("Uid", "").split()
        if uids and int(uids[0]) == uid:
            found.append(int(entry.name))
    return found


def alive(pid: int | None, started: int | None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``started`` is given, is the process that
    started then (not a recycled pid)."""
    if not pid:
        return False
    current = start_time(pid)
    return current is not None and (started is None or current == started)


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
