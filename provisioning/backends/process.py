"""The process backend: each workspace is a detached local process (single-host deployments).

Layout under ``WORKSPACE_DATA_DIR/<workspace id>/`` (owned by the platform, mode 0711):
``configs/`` (the config volume) and ``home/`` (the workspace's home and working folder), both
owned by the workspace's uid with mode 0700; ``instance.json`` (pid, process start time,
generation, uid), ``launch.json`` (what the last launch made: its uid, its monitor, its link,
written before the link is, so a stop or the next start ends exactly that even when the launch
never finished) and ``agent.log``, owned by the platform, so a workspace can neither forge the
pid the platform signals nor rewrite its own log. The process runs in its own session, so it
outlives the worker that started it; a later worker finds it again by the pid file, and the start
time read from ``/proc`` guards against a recycled pid.

Isolation (``WORKSPACE_PROCESS_ISOLATION=uid``, the default): the boundary is what the workspace
is given, not a list of what it is denied. The launch runs as root and moves into namespaces of
the workspace's own: a mount namespace where ``WORKSPACE_PRIVATE_PATHS`` (``/run``, ``/tmp``,
``/dev/shm``, ...) are empty folders of its own, so the host's sockets there are absent, and a
network namespace whose one way out is a veth link to the host (``process_network``), over which
it reaches the registry and nothing else of the host (``process_firewall``) and the proxy reaches
its app. It then drops to the workspace's uid and gid with no supplementary groups and sets
``no_new_privs`` before the workspace's program runs (``process_launch`` and
``process_monitor``: small programs, no interpreter of the worker's per start). The data folder
is passable but not listable by workspace uids. Stopping kills every process of the uid (a child
of the worker with that uid calls ``kill(-1, SIGKILL)``), so nothing a workspace daemonized
survives into the next holder of that uid. A start does the same first for the uid it is given
when that uid's link is there (what runs as the uid runs behind it), and replaces the link:
whatever an earlier holder left (a cycle killed mid-launch, a workspace that held the uid before)
is ended, never left to answer in its place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from django.conf import settings

from provisioning.agent import AGENT_PAGE, AGENT_PYTHON_FLAGS, AGENT_SCRIPT
from provisioning.backends import process_launch, process_network, process_pool, veth
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
from provisioning.backends.process_firewall import FirewallError, ensure_workspace_firewall

NOT_ROOT = (
    "WORKSPACE_PROCESS_ISOLATION=uid (the default) runs each workspace as its own uid, which "
    "needs the platform to run as root; set WORKSPACE_PROCESS_ISOLATION=none only for "
    "single-user development (workspaces then run unisolated, as the platform's user)"
)
WORKSPACE_PATH = "/usr/local/bin:/usr/bin:/bin"


def _isolated() -> bool:
    return settings.WORKSPACE_PROCESS_ISOLATION == "uid"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


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


def _place_env(env: dict[str, str], isolated: bool, link: veth.Pair | None) -> dict[str, str]:
    """What an instance's environment says of where it runs (in place; returns ``env``), the same
    at a launch and at a pool member's claim: ``{python}`` in the app's command is the platform's
    own Python (with the `apps` group) when workspaces run as the platform's user, else
    WORKSPACE_APPS_PYTHON, which workspace uids can run. In a namespace of its own, the host is
    its link's other end, where the registry answers, and its app listens on every address of the
    namespace, the link's included, where the proxy reaches it."""
    if "WORKSPACE_APP_COMMAND" in env:
        apps_python = settings.WORKSPACE_APPS_PYTHON if isolated else sys.executable
        env["WORKSPACE_APP_COMMAND"] = env["WORKSPACE_APP_COMMAND"].replace("{python}", apps_python)
    if link is not None:
        url = env.get("PLATFORM_URL") or settings.PLATFORM_URL
        env["PLATFORM_URL"] = process_network.platform_url(url, link)
        if "WORKSPACE_APP_PORT" in env:
            env["WORKSPACE_APP_HOST"] = "0.0.0.0"
    return env


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
        self.root.chmod(0o711)  # passable, not listable: a workspace sees no other's id
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

    def _instance_file(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "instance.json"

    def _launch_file(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "launch.json"

    def _write_launch(self, workspace_id: UUID | str, launch: dict[str, Any]) -> None:
        target = self._launch_file(workspace_id)
        partial = target.with_suffix(".tmp")
        partial.unlink(missing_ok=True)
        # The platform's alone, as instance.json is.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(launch))
        os.replace(partial, target)

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
            if (
                not monitor
                or not process_launch.alive(monitor, None)
                or time.monotonic() > deadline
            ):
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
                f"{settings.WORKSPACE_FIREWALL_CHAIN} for the workspaces' links): {exc}; "
                "without it workspaces could reach every port of the host at their gateway. "
                "WORKSPACE_PROCESS_ISOLATION=none runs unisolated (single-user development "
                "only)",
            ) from exc
        # Workspace uids pass through the data folder to their own; none may list it.
        self.root.chmod(0o711)
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
        isolated = _isolated()
        # Replace, never duplicate: whatever an earlier (possibly killed) cycle left goes first,
        # and whatever still runs as the uid with it (the uid is this workspace's alone now).
        self._teardown(
            spec.workspace_id,
            state,
            settings.STOP_GRACE_SECONDS,
            uid=self._uid(spec) if isolated else None,
        )
        self._make_dirs(spec)
        env = {
            "PATH": WORKSPACE_PATH if isolated else os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            **spec.env,
            "HOME": str(self._home(spec.workspace_id)),
            "WORKSPACE_CONFIG_DIR": str(self._configs(spec.workspace_id)),
        }
        if spec.pooled:
            home = self._home(spec.workspace_id)
            env["WORKSPACE_CLAIM_FILE"] = str(process_pool.claim_file(home))
            for leftover in (process_pool.claim_file, process_pool.ready_file):
                leftover(home).unlink(missing_ok=True)
        link = process_network.link(self._uid(spec)) if isolated else None
        _place_env(env, isolated, link)
        instance = self._launch(spec, env, link)
        pid = int(instance["pid"])
        if instance.get("start_time") is None or process_launch.start_time(pid) is None:
            raise BackendError(f"the workspace process (pid {pid}) exited at once; see agent.log")
        if spec.pooled:
            process_pool.wait_ready(self._home(spec.workspace_id), pid, instance.get("start_time"))
        # Unisolated, the workspace shares the host's network: its app is on loopback.
        address = link.address if link is not None else "127.0.0.1"
        return {**instance, "address": address, "started_at": time.time()}

    def _launch(
        self, spec: LaunchSpec, env: dict[str, str], link: veth.Pair | None
    ) -> dict[str, Any]:
        """Run the monitor (see ``process_launch``) and return the instance it reports."""
        isolated = _isolated()
        workspace_id = spec.workspace_id
        mounts = process_launch.MountPlan.make(
            settings.WORKSPACE_PRIVATE_PATHS,
            [str(self._dir(workspace_id)), str(self.root / ".agent")],
            settings.WORKSPACE_HIDDEN_PATHS,
        )

        def wire(pid: int) -> None:
            # Recorded before the link is made: a later stop or start finds this launch's
            # monitor and link by it even if this worker dies now.
            assert link is not None
            uid = self._uid(spec)
            name = process_network.link_name(uid)
            self._write_launch(
                workspace_id,
                {
                    "uid": uid,
                    "link": name,
                    "monitor_pid": pid,
                    "monitor_start_time": process_launch.start_time(pid),
                    "generation": spec.generation,
                },
            )
            process_network.wire(pid, name, link)

        try:
            orders = process_launch.orders(
                uid=self._uid(spec) if isolated else None,
                generation=spec.generation,
                log=str(self._dir(workspace_id) / "agent.log"),
                instance_file=str(self._instance_file(workspace_id)),
                exit_file=str(self._exit_file(workspace_id)),
                cwd=str(self._home(workspace_id)),
                mounts=mounts,
                link_wait=process_launch.LINK_WAIT_SECONDS if link is not None else None,
                argv=self._argv(spec),
                env=env,
            )
            return process_launch.launch(
                process_launch.command(isolated, sys.executable, network=link is not None),
                orders,
                wire=wire if link is not None else None,
                timeout=30,
            )
        except process_launch.LaunchError as exc:
            raise BackendError(f"could not start the workspace process: {exc}") from exc

    def app_address(self, workspace_id: UUID, state: State, port: int) -> str:
        # Isolated, the app is in the workspace's namespace, at its end of the link.
        return f"{state.get('address') or '127.0.0.1'}:{port}"

    def _claim_env(self, spec: LaunchSpec) -> dict[str, str]:
        """The claimer's environment as the member's agent takes it in: placed as at a launch."""
        isolated = _isolated()
        link = process_network.link(self._uid(spec)) if isolated else None
        return _place_env(dict(spec.env), isolated, link)

    def claim(self, spec: LaunchSpec, state: State) -> State:
        """Hand the member its claim (``process_pool.hand_over``): the claimer's identity, token
        and env, placed as at a launch."""
        pid, start_time = self._find(spec.workspace_id, state)
        uid = self._uid(spec) if _isolated() else None
        process_pool.hand_over(
            self._home(spec.workspace_id), pid, start_time, uid, self._claim_env(spec)
        )
        return {**state, "claimed_at": time.time()}

    def _find(self, workspace_id: UUID | str, state: State) -> tuple[int | None, int | None]:
        instance = self._read_instance(workspace_id) or state
        pid = instance.get("pid")
        return (int(pid) if pid else None, instance.get("start_time"))

    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
        self._teardown(workspace_id, state, grace_seconds)
        return {}

    def _teardown(
        self, workspace_id: UUID | str, state: State, grace_seconds: float, uid: int | None = None
    ) -> None:
        """End what the workspace's last launch made, as ``launch.json`` and ``instance.json``
        record it, finished or not: the instance (SIGTERM, then SIGKILL after the grace), its
        monitor, every process of its uid, and its link; and ``uid``'s (the one a start is about
        to use) when its link is there, the sign that an earlier holder may still run."""
        launch = _read_json(self._launch_file(workspace_id))
        instance = self._read_instance(workspace_id) or state
        self._stop_leader(workspace_id, state, grace_seconds)
        # The monitor exits once its instance has (it records the exit code first); one whose
        # launch was never finished (its worker hangs) is waiting for its link: end it before
        # the uid is freed, so it forks nothing after.
        monitor = launch.get("monitor_pid")
        if isinstance(monitor, int):
            started = launch.get("monitor_start_time")
            finished = instance.get("monitor_pid") == monitor
            self._end_monitor(monitor, started, wait=1.0 if finished else 0.0)
        uids = {value for value in (instance.get("uid"), launch.get("uid"))}
        # What runs as a uid runs in that uid's namespace, which holds the uid's link: no link,
        # nothing to end (freeing a uid forks the worker, about 15 ms a start on a 2-core host).
        if uid is not None and _isolated() and process_network.link_exists(uid):
            uids.add(uid)
        for each in sorted(value for value in uids if isinstance(value, int) and value > 0):
            self._kill_uid(each)
        if _isolated():
            # Nothing of the workspace is left in its namespace: the link would go with it,
            # a moment later; deleting it now frees its name and addresses at once.
            names = {launch.get("link")}
            names |= {process_network.link_name(value) for value in uids if isinstance(value, int)}
            for name in sorted(value for value in names if isinstance(value, str)):
                process_network.unwire(name)
        self._instance_file(workspace_id).unlink(missing_ok=True)
        self._launch_file(workspace_id).unlink(missing_ok=True)

    def _end_monitor(self, pid: int, start_time: int | None, wait: float) -> None:
        deadline = time.monotonic() + wait
        while process_launch.alive(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not process_launch.alive(pid, start_time):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_launch.alive(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.01)
        if process_launch.alive(pid, start_time):
            raise BackendError(f"the workspace's monitor {pid} survived SIGKILL")

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
        while (pids := process_launch.uid_processes(uid)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        if process_launch.uid_processes(uid):
            raise BackendError(f"processes of workspace uid {uid} survived SIGKILL")

    def _stop_leader(self, workspace_id: UUID | str, state: State, grace_seconds: float) -> None:
        pid, start_time = self._find(workspace_id, state)
        if pid and process_launch.alive(pid, start_time):
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while process_launch.alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_launch.alive(pid, start_time):
                self._signal(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while process_launch.alive(pid, start_time) and time.monotonic() < deadline:
                    time.sleep(0.02)
            if process_launch.alive(pid, start_time):
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
        self.stop(workspace_id, state, grace_seconds=settings.STOP_GRACE_SECONDS)
        shutil.rmtree(self._dir(workspace_id), ignore_errors=True)

    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        pid, start_time = self._find(workspace_id, state)
        if not pid:
            return InstanceStatus(exists=False, running=False, detail="no process recorded")
        if process_launch.alive(pid, start_time):
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
            if process_launch.alive(pid, start_time):
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
                    running=process_launch.alive(pid, data.get("start_time")),
                    generation=data.get("generation"),
                    ref=str(pid or ""),
                )
            )
        return found
