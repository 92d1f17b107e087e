"""The process backend's monitor: a small program the worker starts (``python -I -S`` on this
file, behind util-linux ``setsid --fork`` and, under uid isolation, ``unshare --mount``), never
imported by the platform.

It reads its orders on stdin (NUL-separated, see ``provisioning.backends.process_launch``), gives
its mount namespace empty folders of its own over ``WORKSPACE_PRIVATE_PATHS`` (binding the
workspace's own folder back) and hides ``WORKSPACE_HIDDEN_PATHS`` with ``mount``; in a network
namespace of its own it reports its pid and waits (bounded) for the worker to wire the link; it
forks the instance into a session of its own, records the instance's pid and start time in
``instance.json``, reports them on stdout, lets go of the worker's pipes, waits for the instance
and records its exit code in ``exit.json``. It is the instance's parent, so it alone can see
that code; it outlives the worker.

The instance drops to the workspace's uid and gid with no supplementary groups before it execs
anything, and execs ``setpriv --no-new-privs`` first: no code runs as root with the workspace's
environment (``LD_PRELOAD`` and the like would otherwise run as root), and no setuid program gives
root back afterwards.

Only ``os``, ``select`` and ``sys``: with ``-S`` the interpreter starts without ``site``, and each
further module is start-up time paid on every workspace start.
"""

import os
import select
import sys

MOUNT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Each private folder: writable by all like /tmp, no device or setuid file honoured, bounded.
PRIVATE_OPTIONS = b"mode=1777,nosuid,nodev,size=64m"
HIDDEN_OPTIONS = b"size=4k,mode=000,nosuid,nodev,noexec"


def read_orders() -> list[bytes]:
    """The orders: their length on a line, then that many bytes (what may follow on stdin is
    the worker's go-ahead, read later)."""
    head = b""
    while not head.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            fail("no orders")
        head += byte
    size = int(head)
    chunks, got = [], 0
    while got < size:
        chunk = os.read(0, size - got)
        if not chunk:
            fail("the orders were cut short")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks).split(b"\0")


def take(fields: list[bytes], count: int) -> list[bytes]:
    taken = fields[:count]
    del fields[:count]
    return taken


def fail(message: str) -> None:
    os.write(2, message.encode(errors="replace") + b"\n")
    sys.exit(1)


def run_mount(mount: bytes, argv: list[bytes]) -> None:
    pid = os.posix_spawn(mount, [mount, *argv], {"PATH": MOUNT_PATH})
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        fail(f"mount {os.fsdecode(argv[-1])} failed")


def make_private(mount: bytes, private: list[bytes], keep: list[bytes]) -> None:
    """An empty tmpfs of the workspace's own over each of ``private``, and each of ``keep`` (the
    workspace's folder, the agent's) bound back where it was. ``unshare --mount`` made this
    namespace private to the monitor. A kept folder is held open (``O_PATH``) before it is
    covered, and bound from that handle: its path no longer leads to it then."""
    held = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep]
    for path in private:
        run_mount(mount, [b"-t", b"tmpfs", b"-o", PRIVATE_OPTIONS, b"tmpfs", path])
    for fd, path in zip(held, keep, strict=True):
        make_folders(path)
        # -c: the handle's /proc path is passed as it is, not resolved to the covered path.
        source = b"/proc/%d/fd/%d" % (os.getpid(), fd)
        run_mount(mount, [b"-c", b"--bind", source, path])
        os.close(fd)


def make_folders(path: bytes) -> None:
    """``path`` and its parents in a fresh tmpfs, each passable (not listable) by others."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.mkdir(folder)
        os.chmod(folder, 0o711)


def hide(mount: bytes, folders: list[bytes], files: list[bytes]) -> None:
    """Cover each folder with an empty tmpfs and each file with /dev/null (named paths outside
    the private folders)."""
    for path in folders:
        run_mount(mount, [b"-t", b"tmpfs", b"-o", HIDDEN_OPTIONS, b"tmpfs", path])
    for path in files:
        run_mount(mount, [b"--bind", b"/dev/null", path])


def await_link(seconds: float) -> None:
    """Report this process's pid (its network namespace's) and wait, at most ``seconds``, until
    the worker has wired the link; anything but its go-ahead in time (the worker failed, died or
    hangs) ends the launch here, and the namespace with its link goes with this process."""
    os.write(1, b"%d\n" % os.getpid())
    ready, _, _ = select.select([0], [], [], seconds)
    if not ready:
        fail(f"the workspace's link was not made within {seconds:g} s")
    if os.read(0, 1) != b"g":
        fail("the workspace's link was not made")


def resolve(program: bytes, env: dict[bytes, bytes]) -> bytes | None:
    """Where ``program`` is found on the instance's PATH (as exec will look), None if nowhere."""
    if b"/" in program:
        return program if os.path.isfile(program) else None
    for folder in env.get(b"PATH", b"/usr/bin:/bin").split(b":"):
        candidate = os.path.join(folder or b".", program)
        if os.path.isfile(candidate):
            return candidate
    return None


def start_time_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        return int(stat[stat.rfind(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def write_json(path: bytes, text: str) -> None:
    partial = path + b".tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(partial, path)


def json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def main() -> None:
    os.umask(0o077)  # the log, the pid file and the exit file are the platform's alone
    fields = read_orders()
    uid_field, generation, log, instance_file, exit_file, cwd, setpriv, mount, network = take(
        fields, 9
    )
    uid = int(uid_field) if uid_field else None
    private = take(fields, int(take(fields, 1)[0]))
    keep = take(fields, int(take(fields, 1)[0]))
    folders = take(fields, int(take(fields, 1)[0]))
    files = take(fields, int(take(fields, 1)[0]))
    argv = take(fields, int(take(fields, 1)[0]))
    env = dict(item.split(b"=", 1) for item in fields if item)
    if uid is not None:
        make_private(mount, private, keep)
        hide(mount, folders, files)
    if network:
        await_link(float(network))
    if resolve(argv[0], env) is None:
        fail(f"[Errno 2] No such file or directory: {os.fsdecode(argv[0])!r}")
    devnull = os.open(os.devnull, os.O_RDWR)
    errors_read, errors_write = os.pipe()  # close-on-exec: empty at EOF means exec succeeded
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_read)
            os.setsid()
            output = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(devnull, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.chdir(cwd)
            if uid is None:
                os.closerange(3, errors_write)
                os.closerange(errors_write + 1, 65536)
                os.execvpe(argv[0], argv, env)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.closerange(3, errors_write)
            os.closerange(errors_write + 1, 65536)
            os.execve(setpriv, [setpriv, b"--no-new-privs", b"--", *argv], env)
        except OSError as exc:
            os.write(errors_write, str(exc).encode(errors="replace"))
        os._exit(127)
    os.close(errors_write)
    with os.fdopen(errors_read, "rb") as errors:
        failed = errors.read()
    if failed:
        os.waitpid(pid, 0)
        fail(failed.decode(errors="replace"))
    start_time = start_time_of(pid)
    instance = (
        f'{{"pid": {pid}, "start_time": {json_int(start_time)}, '
        f'"generation": {int(generation)}, "monitor_pid": {os.getpid()}, '
        f'"uid": {json_int(uid)}}}'
    )
    write_json(instance_file, instance)
    os.write(1, instance.encode())
    for fd in (0, 1, 2):  # let go of the worker's pipes: it reads them to their end
        os.dup2(devnull, fd)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    write_json(
        exit_file,
        f'{{"pid": {pid}, "start_time": {json_int(start_time)}, '
        f'"generation": {int(generation)}, "exit_code": {code}}}',
    )


if __name__ == "__main__":
    main()
