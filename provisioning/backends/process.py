"""The process backend: each workspace is a detached local process (single-host deployments).

Layout under ``WORKSPACE_DATA_DIR/<workspace id>/`` (owned by the platform, mode 0711):
``configs/`` (the config volume) and ``home/`` (the workspace's home and working folder), both
owned by the workspace's uid with mode 0700; ``instance.json`` (pid, process start time,
generation, uid) and ``agent.log``, owned by the platform, so a workspace can neither forge the
pid the platform signals nor rewrite its own log. The process runs in its own session, so it
outlives the worker that started it; a later worker finds it again by the pid file, and the start
time read from ``/proc`` guards against a recycled pid.

Isolation (``WORKSPACE_PROCESS_ISOLATION=uid``, the default): the launch runs as root, moves
into a private mount namespace where ``WORKSPACE_HIDDEN_PATHS`` (PostgreSQL's, Redis's and the
engine's unix sockets) are covered up, then drops to the workspace's uid and gid with no
supplementary groups and sets ``no_new_privs`` before the workspace's program runs
(``process_launch`` and ``process_monitor``: small programs, no interpreter of the worker's per
start). ``provisioning.backends.process_firewall`` keeps those uids off the host's ports except the
registry's. Stopping kills every process of the uid (a child of the worker with that uid calls
``kill(-1, SIGKILL)``), so nothing a workspace daemonized survives into the next holder of that uid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from django.conf import settings

from provisioning.agent import AGENT_PAGE, AGENT_PYTHON_FLAGS, AGENT_SCRIPT
from provisioning.backends import process_launch
from provisioning.backends.base import (
    CONFIG_MARKER,
    BackendError,
    BackendUnavailable,
    ConfigState,
    InstanceInfo,
    InstanceStatus,
    LaunchSpec,
    LogItem,
    State,
    WorkspaceBackend,
    last_lines,
)
from provisioning.backends.follow import Seen, follow_file
from provisioning.backends.process_firewall import (
    FirewallError,
    allow_own_app,
    ensure_workspace_firewall,
    revoke_own_app,
)

NOT_ROOT = (
    "WORKSPACE_PROCESS_ISOLATION=uid (the default) runs each workspace as its own uid, which "
    "needs the platform to run as root; set WORKSPACE_PROCESS_ISOLATION=none only for "
    "single-user development (workspaces then run unisolated, as the platform's user)"
)
WORKSPACE_PATH = "/usr/local/bin:/usr/bin:/bin"


def _proc_start_time(pid: int) -> int | None:
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


def _uid_processes(uid: int) -> list[int]:
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


def _isolated() -> bool:
    return settings.WORKSPACE_PROCESS_ISOLATION == "uid"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _alive(pid: int | None, start_time: int | None) -> bool:
    if not pid:
        return False
    current = _proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def _closed_ancestor(path: Path) -> Path | None:
    """The first folder on the way to ``path`` that others cannot traverse, if any."""
    for folder in [*reversed(path.resolve().parents), path.resolve()]:
        try:
            if not folder.stat().st_mode & 0o001:
                return folder
        except OSError:
            return folder
    return None


def _exited(pid: int, exit_code: int | None) -> str:
    ending = f" with code {exit_code}" if exit_code is not None else ""
    return f"process {pid} has exited{ending}"


def _resolve_app_python(env: dict[str, str], isolated: bool) -> dict[str, str]:
    """``{python}`` in the app's command (in place; returns ``env``). An app's Python: the
    platform's own (with the `apps` group) when workspaces run as the platform's user;
    WORKSPACE_APPS_PYTHON, which workspace uids can run, otherwise."""
    if "WORKSPACE_APP_COMMAND" in env:
        apps_python = settings.WORKSPACE_APPS_PYTHON if isolated else sys.executable
        env["WORKSPACE_APP_COMMAND"] = env["WORKSPACE_APP_COMMAND"].replace("{python}", apps_python)
    return env


# How long a pool member's agent may take to wait for its claim (an interpreter's start).
POOL_READY_SECONDS = 10.0


class ProcessBackend(WorkspaceBackend):
    name = "process"
    keeps_pools = True

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or settings.WORKSPACE_DATA_DIR)
        self._agent_copied = False

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, workspace_id: UUID | str) -> Path:
        return self.root / str(workspace_id)

    def _configs(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "configs"

    def _home(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "home"

    def _make_dirs(self, spec: LaunchSpec) -> None:
        """The platform's 0711 folder, and the workspace's own 0700 ``configs`` and ``home``."""
        directory = self._dir(spec.workspace_id)
        directory.mkdir(parents=True, exist_ok=True)
        owned = (self._configs(spec.workspace_id), self._home(spec.workspace_id))
        for folder in owned:
            folder.mkdir(exist_ok=True)
        if not _isolated():
            return
        uid = self._uid(spec)
        os.chown(directory, 0, 0)
        directory.chmod(0o711)
        for folder in owned:
            os.chown(folder, uid, uid)
            folder.chmod(0o700)

    @staticmethod
    def _uid(spec: LaunchSpec) -> int:
        if spec.uid is None:
            raise BackendError(
                "the workspace has no isolation uid (WORKSPACE_PROCESS_ISOLATION=uid needs one)"
            )
        return spec.uid

    # A warm pool's member (docs/architecture.md "Warm pools"): its agent says it waits by the
    # ready file, and reads its claim from the claim file, both in its own 0700 home.
    def _claim_file(self, workspace_id: UUID | str) -> Path:
        return self._home(workspace_id) / ".workspace-claim"

    def _pool_ready_file(self, workspace_id: UUID | str) -> Path:
        claim = self._claim_file(workspace_id)
        return claim.with_name(claim.name + ".ready")  # where the agent puts it

    def _instance_file(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "instance.json"

    def _exit_file(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "exit.json"

    def _read_instance(self, workspace_id: UUID | str) -> dict[str, Any]:
        return _read_json(self._instance_file(workspace_id))

    def _exit_code(self, workspace_id: UUID | str, pid: int, start_time: int | None) -> int | None:
        """The exit code the monitor recorded for this instance (pid and start time), waiting a
        moment for a monitor that is still writing it; None when it is unknown (the monitor was
        killed too)."""
        instance = self._read_instance(workspace_id)
        monitor = instance.get("monitor_pid") if instance.get("pid") == pid else None
        deadline = time.monotonic() + 1.0
        while True:
            recorded = _read_json(self._exit_file(workspace_id))
            if recorded.get("pid") == pid and recorded.get("start_time") == start_time:
                code = recorded.get("exit_code")
                return int(code) if isinstance(code, int) else None
            if not monitor or not _alive(monitor, None) or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def output_tail(self, workspace_id: UUID | str, lines: int) -> str:
        """The last ``lines`` lines of the workspace's output (its agent.log)."""
        if lines <= 0:
            return ""
        try:
            with open(self._dir(workspace_id) / "agent.log", "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16 * 1024))
                data = handle.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # -- contract ------------------------------------------------------------------------------
    def check_available(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(self.name, f"cannot create {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise BackendUnavailable(self.name, f"{self.root} is not writable")
        missing = process_launch.missing_tools(_isolated())
        if missing:
            raise BackendUnavailable(
                self.name,
                f"{', '.join(missing)} not found on {process_launch.SYSTEM_PATH}: the launcher "
                "needs util-linux (setsid, unshare, setpriv) and mount",
            )
        if not _isolated():
            return
        if os.geteuid() != 0:
            raise BackendUnavailable(self.name, NOT_ROOT)
        try:
            ensure_workspace_firewall()
        except FirewallError as exc:
            raise BackendUnavailable(
                self.name,
                f"cannot install the workspace firewall (nftables table "
                f"{settings.WORKSPACE_FIREWALL_CHAIN}"
                f" for WORKSPACE_UID_RANGE): {exc}; without it workspaces could reach "
                "PostgreSQL and Redis. WORKSPACE_PROCESS_ISOLATION=none runs unisolated "
                "(single-user development only)",
            ) from exc
        closed = _closed_ancestor(self.root)
        if closed is not None:
            raise BackendUnavailable(
                self.name,
                f"WORKSPACE_DATA_DIR {self.root} is inside {closed}, which workspace uids cannot "
                "enter (it needs o+x): choose a data folder outside it",
            )

    def prepare(self, spec: LaunchSpec, state: State) -> State:
        self._make_dirs(spec)
        return dict(state)

    def config_state(self, spec: LaunchSpec, state: State) -> ConfigState:
        marker = self._configs(spec.workspace_id) / CONFIG_MARKER
        return ConfigState.PROVISIONED if marker.is_file() else ConfigState.EMPTY

    def write_config(self, spec: LaunchSpec, state: State, files: Mapping[str, bytes]) -> None:
        configs = self._configs(spec.workspace_id).resolve()
        configs.mkdir(parents=True, exist_ok=True)
        for relative, content in files.items():
            target = (configs / relative).resolve()
            if configs not in target.parents:
                raise BackendError(f"template file {relative!r} escapes the config folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        marker = {"template": spec.template.name, "generation": spec.generation, "at": time.time()}
        (configs / CONFIG_MARKER).write_text(json.dumps(marker))
        if _isolated():
            # Written by the platform, used (and maybe changed) by the workspace: hand them over.
            uid = self._uid(spec)
            for path in [configs, *configs.rglob("*")]:
                if not path.is_symlink():
                    os.chown(path, uid, uid)

    def _agent(self) -> Path:
        """The agent script (and its page) copied under the data folder, which workspace uids
        can traverse: the platform's checkout may sit in a folder they cannot enter."""
        if not _isolated():
            return AGENT_SCRIPT
        copied = self.root / ".agent" / AGENT_SCRIPT.name
        if self._agent_copied and copied.is_file():
            return copied  # once per process: the files only change with a new release
        folder = self.root / ".agent"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
        for source in (AGENT_SCRIPT, AGENT_PAGE):
            target = folder / source.name
            content = source.read_bytes()
            if not target.is_file() or target.read_bytes() != content:
                # One name per process: workers copying at once must not rename each other's.
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(content)
                partial.chmod(0o644)
                os.replace(partial, target)
        self._agent_copied = True
        return copied

    def _argv(self, spec: LaunchSpec) -> list[str]:
        python = settings.WORKSPACE_PYTHON
        agent = str(self._agent())
        if spec.template.command:
            return [
                part.replace("{python}", python).replace("{agent}", agent)
                for part in spec.template.command
            ]
        return [python, *AGENT_PYTHON_FLAGS, agent]

    def start(self, spec: LaunchSpec, state: State) -> State:
        # Replace, never duplicate: whatever an earlier (possibly killed) cycle left goes first.
        self.stop(spec.workspace_id, state, grace_seconds=settings.STOP_GRACE_SECONDS)
        directory = self._dir(spec.workspace_id)
        self._make_dirs(spec)
        isolated = _isolated()
        env = {
            "PATH": WORKSPACE_PATH if isolated else os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            **spec.env,
            "HOME": str(self._home(spec.workspace_id)),
            "WORKSPACE_CONFIG_DIR": str(self._configs(spec.workspace_id)),
        }
        if spec.pooled:
            env["WORKSPACE_CLAIM_FILE"] = str(self._claim_file(spec.workspace_id))
            for leftover in (self._claim_file, self._pool_ready_file):
                leftover(spec.workspace_id).unlink(missing_ok=True)
        _resolve_app_python(env, isolated)
        if isolated and spec.env.get("WORKSPACE_APP_PORT", "").isdigit():
            # The agent, as the workspace's uid, checks that its own app answers.
            try:
                allow_own_app(self._uid(spec), int(spec.env["WORKSPACE_APP_PORT"]))
            except FirewallError as exc:
                raise BackendError(f"cannot open the workspace's app port to it: {exc}") from exc
        try:
            orders = process_launch.orders(
                uid=self._uid(spec) if isolated else None,
                generation=spec.generation,
                log=str(directory / "agent.log"),
                instance_file=str(self._instance_file(spec.workspace_id)),
                exit_file=str(self._exit_file(spec.workspace_id)),
                cwd=str(self._home(spec.workspace_id)),
                hidden=settings.WORKSPACE_HIDDEN_PATHS,
                argv=self._argv(spec),
                env=env,
            )
            launched = subprocess.run(
                process_launch.command(isolated, sys.executable),
                input=orders,
                capture_output=True,
                timeout=30,
                check=False,
                env={"PATH": process_launch.SYSTEM_PATH},
            )
        except (OSError, subprocess.TimeoutExpired, process_launch.LaunchError) as exc:
            raise BackendError(f"could not launch the workspace process: {exc}") from exc
        if launched.returncode != 0 or not launched.stdout.strip():
            detail = launched.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise BackendError(
                f"could not start the workspace process: {' '.join(detail) or 'no report'}"
            )
        instance = dict(json.loads(launched.stdout))
        pid = int(instance["pid"])
        if instance.get("start_time") is None or _proc_start_time(pid) is None:
            raise BackendError(f"the workspace process (pid {pid}) exited at once; see agent.log")
        if spec.pooled:
            self._wait_pool_ready(spec, pid, instance.get("start_time"))
        # The proxy (the platform's user, which the firewall does not restrict) reaches the
        # workspace's ports on loopback.
        return {**instance, "address": "127.0.0.1", "started_at": time.time()}

    def _wait_pool_ready(self, spec: LaunchSpec, pid: int, start_time: int | None) -> None:
        """A member is ready once its agent waits for the claim's signal (it blocked SIGUSR1
        first: a claim signalled earlier would end it, since the default action terminates)."""
        ready = self._pool_ready_file(spec.workspace_id)
        deadline = time.monotonic() + POOL_READY_SECONDS
        while not ready.exists():
            if not _alive(pid, start_time):
                raise BackendError(
                    "the pool member's agent exited before it was ready; see agent.log"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"the pool member's agent was not ready in {POOL_READY_SECONDS} s"
                )
            time.sleep(0.005)

    def claim(self, spec: LaunchSpec, state: State) -> State:
        """Write the claim (identity, token, env: JSON) into the member's 0700 home, owned by
        its uid, mode 0600, by rename so the agent never reads half of it; then SIGUSR1 wakes
        it. Only the member's uid (and root) can read it; the agent deletes it once read."""
        pid, start_time = self._find(spec.workspace_id, state)
        if pid is None or not _alive(pid, start_time):
            raise BackendError("the pool member's agent is not running")
        if not self._pool_ready_file(spec.workspace_id).exists():
            raise BackendError("the pool member's agent is not waiting for a claim")
        target = self._claim_file(spec.workspace_id)
        partial = target.with_name(target.name + ".tmp")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            if _isolated():
                os.fchown(handle.fileno(), self._uid(spec), self._uid(spec))
            handle.write(json.dumps(_resolve_app_python(dict(spec.env), _isolated())).encode())
        os.replace(partial, target)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError as exc:
            target.unlink(missing_ok=True)
            raise BackendError("the pool member's agent exited before its claim") from exc
        return {**state, "claimed_at": time.time()}

    def _find(self, workspace_id: UUID | str, state: State) -> tuple[int | None, int | None]:
        instance = self._read_instance(workspace_id) or state
        pid = instance.get("pid")
        return (int(pid) if pid else None, instance.get("start_time"))

    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
        uid = (self._read_instance(workspace_id) or state).get("uid")
        self._stop_leader(workspace_id, state, grace_seconds)
        if isinstance(uid, int) and uid > 0:
            self._kill_uid(uid)
        self._instance_file(workspace_id).unlink(missing_ok=True)
        return {}

    @staticmethod
    def _kill_uid(uid: int) -> None:
        """SIGKILL whatever the workspace's uid still runs outside its process group (a daemon
        it forked into a session of its own), so the uid is free when it is handed out again."""
        if process_launch.kill_uid(uid):
            return
        # The uid's own child could not tell (killed or stopped by the uid, or a zombie of the
        # uid outlived its short wait): walk /proc as root, which no process of the uid can
        # disturb.
        deadline = time.monotonic() + 5
        while (pids := _uid_processes(uid)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        if _uid_processes(uid):
            raise BackendError(f"processes of workspace uid {uid} survived SIGKILL")

    def _stop_leader(self, workspace_id: UUID, state: State, grace_seconds: float) -> None:
        pid, start_time = self._find(workspace_id, state)
        if pid and _alive(pid, start_time):
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while _alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid, start_time):
                self._signal(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while _alive(pid, start_time) and time.monotonic() < deadline:
                    time.sleep(0.02)
            if _alive(pid, start_time):
                raise BackendError(f"workspace process {pid} survived SIGKILL")

    @staticmethod
    def _signal(pid: int, signum: signal.Signals) -> None:
        # The instance leads its own process group: signal the group so its children go too.
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def remove(self, workspace_id: UUID, state: State) -> None:
        uid = (self._read_instance(workspace_id) or state).get("uid")
        self.stop(workspace_id, state, grace_seconds=settings.STOP_GRACE_SECONDS)
        if isinstance(uid, int) and uid > 0 and _isolated():
            # Before the uid can be handed to another workspace (its first start replaces any
            # rule of its uid anyway).
            with contextlib.suppress(FirewallError):
                revoke_own_app(uid)
        shutil.rmtree(self._dir(workspace_id), ignore_errors=True)

    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        pid, start_time = self._find(workspace_id, state)
        if not pid:
            return InstanceStatus(exists=False, running=False, detail="no process recorded")
        if _alive(pid, start_time):
            return InstanceStatus(exists=True, running=True, detail=f"process {pid} is running")
        exit_code = self._exit_code(workspace_id, pid, start_time)
        return InstanceStatus(
            exists=False,
            running=False,
            exit_code=exit_code,
            detail=_exited(pid, exit_code),
            output_tail=self.output_tail(workspace_id, settings.DEATH_OUTPUT_LINES),
        )

    def logs(self, workspace_id: UUID, state: State, tail: int, max_bytes: int) -> str:
        # Read only the file's end: an instance may have written gigabytes.
        try:
            with open(self._dir(workspace_id) / "agent.log", "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                data = handle.read(max_bytes)
        except OSError:
            return ""
        return last_lines(data, tail, max_bytes)

    def follow_logs(
        self,
        workspace_id: UUID,
        state: State,
        *,
        tail: int,
        max_bytes: int,
        max_line_bytes: int,
        poll_seconds: float,
    ) -> AsyncIterator[LogItem]:
        # Every cycle's instance appends to the same agent.log; the pid file says which
        # instance is writing (a new pid and start time: a new instance).
        def look() -> Seen:
            pid, start_time = self._find(workspace_id, {})
            if not pid:
                # A stop removes the pid file; the monitor's exit file still names the instance
                # (the same key: an exit, not a new instance) and how it ended.
                ended = _read_json(self._exit_file(workspace_id))
                if not ended.get("pid"):
                    return Seen(None, False, "no process recorded")
                code = ended.get("exit_code")
                return Seen(
                    (ended["pid"], ended.get("start_time")),
                    False,
                    _exited(ended["pid"], code if isinstance(code, int) else None),
                )
            if _alive(pid, start_time):
                return Seen((pid, start_time), True, f"process {pid} is running")
            # Only the exit code (status() would also read the output's tail, every poll).
            code = self._exit_code(workspace_id, pid, start_time)
            return Seen((pid, start_time), False, _exited(pid, code))

        return follow_file(
            self._dir(workspace_id) / "agent.log",
            look,
            tail=tail,
            max_bytes=max_bytes,
            max_line_bytes=max_line_bytes,
            poll_seconds=poll_seconds,
        )

    def list_instances(self) -> list[InstanceInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for instance_file in self.root.glob("*/instance.json"):
            workspace_id = instance_file.parent.name
            data = self._read_instance(workspace_id)
            pid = data.get("pid")
            found.append(
                InstanceInfo(
                    workspace_id=workspace_id,
                    running=_alive(pid, data.get("start_time")),
                    generation=data.get("generation"),
                    ref=str(pid or ""),
                )
            )
        return found
