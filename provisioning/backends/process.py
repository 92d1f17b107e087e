"""The process backend: each workspace is a detached local process (single-host deployments).

Layout under ``WORKSPACE_DATA_DIR/<workspace id>/``: ``configs/`` (the config volume),
``instance.json`` (pid, process start time, generation) and ``agent.log``. The process runs in its
own session, so it outlives the worker that started it; a later worker finds it again by the pid
file, and the start time read from ``/proc`` guards against a recycled pid.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from django.conf import settings

from provisioning.agent import AGENT_SCRIPT
from provisioning.backends.base import (
    CONFIG_MARKER,
    BackendError,
    BackendUnavailable,
    ConfigState,
    InstanceInfo,
    InstanceStatus,
    LaunchSpec,
    State,
    WorkspaceBackend,
)

# Runs the instance in a new session and exits at once, so the instance is re-parented away from
# the worker (no zombies in the worker) and survives the worker. The environment arrives on
# stdin, never in argv where `ps` would show secrets. The launcher, not the worker, records the
# pid file: a worker killed right after the launch would otherwise leave a running instance no
# later cycle can find, and the next start would run a second one.
_LAUNCHER = """
import json, os, subprocess, sys
spec = json.load(sys.stdin)
log = open(spec["log"], "ab")
proc = subprocess.Popen(spec["argv"], env=spec["env"], cwd=spec["cwd"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, close_fds=True)
try:
    with open(f"/proc/{proc.pid}/stat") as handle:
        stat = handle.read()
    start_time = int(stat[stat.rfind(")") + 2:].split()[19])
except (OSError, ValueError, IndexError):
    start_time = None
instance = {"pid": proc.pid, "start_time": start_time, "generation": spec["generation"]}
tmp = spec["instance_file"] + ".tmp"
with open(tmp, "w") as handle:
    json.dump(instance, handle)
os.replace(tmp, spec["instance_file"])
print(json.dumps(instance))
"""


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


def _alive(pid: int | None, start_time: int | None) -> bool:
    if not pid:
        return False
    current = _proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


class ProcessBackend(WorkspaceBackend):
    name = "process"

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or settings.WORKSPACE_DATA_DIR)

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, workspace_id: UUID | str) -> Path:
        return self.root / str(workspace_id)

    def _configs(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "configs"

    def _instance_file(self, workspace_id: UUID | str) -> Path:
        return self._dir(workspace_id) / "instance.json"

    def _read_instance(self, workspace_id: UUID | str) -> dict[str, Any]:
        try:
            return dict(json.loads(self._instance_file(workspace_id).read_text()))
        except (OSError, ValueError):
            return {}

    # -- contract ------------------------------------------------------------------------------
    def check_available(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(self.name, f"cannot create {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise BackendUnavailable(self.name, f"{self.root} is not writable")

    def prepare(self, spec: LaunchSpec, state: State) -> State:
        self._configs(spec.workspace_id).mkdir(parents=True, exist_ok=True)
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

    def _argv(self, spec: LaunchSpec) -> list[str]:
        if spec.template.command:
            return [
                part.replace("{python}", sys.executable).replace("{agent}", str(AGENT_SCRIPT))
                for part in spec.template.command
            ]
        return [sys.executable, str(AGENT_SCRIPT)]

    def start(self, spec: LaunchSpec, state: State) -> State:
        # Replace, never duplicate: whatever an earlier (possibly killed) cycle left goes first.
        self.stop(spec.workspace_id, state, grace_seconds=settings.STOP_GRACE_SECONDS)
        directory = self._dir(spec.workspace_id)
        self._configs(spec.workspace_id).mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            **spec.env,
            "WORKSPACE_CONFIG_DIR": str(self._configs(spec.workspace_id)),
        }
        payload = {
            "argv": self._argv(spec),
            "env": env,
            "cwd": str(directory),
            "log": str(directory / "agent.log"),
            "instance_file": str(self._instance_file(spec.workspace_id)),
            "generation": spec.generation,
        }
        try:
            launched = subprocess.run(
                [sys.executable, "-I", "-c", _LAUNCHER],
                input=json.dumps(payload).encode(),
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"could not launch the workspace process: {exc}") from exc
        if launched.returncode != 0:
            detail = launched.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise BackendError(f"could not launch the workspace process: {' '.join(detail)}")
        instance = dict(json.loads(launched.stdout))
        pid = int(instance["pid"])
        if instance.get("start_time") is None or _proc_start_time(pid) is None:
            raise BackendError(f"the workspace process (pid {pid}) exited at once; see agent.log")
        return {**instance, "started_at": time.time()}

    def _find(self, workspace_id: UUID | str, state: State) -> tuple[int | None, int | None]:
        instance = self._read_instance(workspace_id) or state
        pid = instance.get("pid")
        return (int(pid) if pid else None, instance.get("start_time"))

    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
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
        self._instance_file(workspace_id).unlink(missing_ok=True)
        return {}

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
        if _alive(pid, start_time):
            return InstanceStatus(exists=True, running=True, detail=f"process {pid} is running")
        return InstanceStatus(exists=False, running=False, detail=f"process {pid} has exited")

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
