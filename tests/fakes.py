"""A fake backend that implements the real contract, for orchestration tests.

It keeps instances in memory and records every call, so a test can assert what the lifecycle
asked of the backend (e.g. preflight never calls it). Tests of the real backends use the real
process backend or a real Docker engine, never this.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast
from uuid import UUID

from provisioning import backends
from provisioning.backends.base import (
    BackendError,
    BackendUnavailable,
    ConfigState,
    InstanceChange,
    InstanceInfo,
    InstanceNotice,
    InstanceStatus,
    LaunchSpec,
    LineSplitter,
    LogItem,
    State,
    TransientBackendError,
    WorkspaceBackend,
)


class FakeBackend(WorkspaceBackend):
    name = "fake"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []
        self.running: dict[str, int] = {}  # workspace id -> generation
        self.configs: dict[str, dict[str, bytes]] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.unavailable: str | None = None
        self.fail_start: BackendError | None = None
        self.output: dict[str, list[str]] = {}  # workspace id -> lines its instance "wrote"
        # method name -> called when that method is entered, after the call is recorded (a test
        # makes something happen "during" a backend call, e.g. the gate's lease is lost).
        self.during: dict[str, Callable[[], None]] = {}

    def _call(self, method: str, workspace_id: UUID | str) -> None:
        with self.lock:
            self.calls.append((method, str(workspace_id)))
        hook = self.during.get(method)
        if hook is not None:
            hook()

    def calls_for(self, workspace_id: UUID | str) -> list[str]:
        return [method for method, ws in self.calls if ws == str(workspace_id)]

    def check_available(self) -> None:
        hook = self.during.get("check_available")
        if hook is not None:
            hook()
        if self.unavailable:
            raise BackendUnavailable(self.name, self.unavailable)

    def prepare(self, spec: LaunchSpec, state: State) -> State:
        self._call("prepare", spec.workspace_id)
        self.configs.setdefault(str(spec.workspace_id), {})
        return dict(state)

    def config_state(self, spec: LaunchSpec, state: State) -> ConfigState:
        self._call("config_state", spec.workspace_id)
        files = self.configs.get(str(spec.workspace_id), {})
        return ConfigState.PROVISIONED if ".provisioned" in files else ConfigState.EMPTY

    def write_config(self, spec: LaunchSpec, state: State, files: Mapping[str, bytes]) -> None:
        self._call("write_config", spec.workspace_id)
        self.configs[str(spec.workspace_id)] = {**files, ".provisioned": b"1"}

    def start(self, spec: LaunchSpec, state: State) -> State:
        self._call("start", spec.workspace_id)
        if self.fail_start is not None:
            raise self.fail_start
        self.running[str(spec.workspace_id)] = spec.generation
        self.env[str(spec.workspace_id)] = dict(spec.env)
        return {"generation": spec.generation}

    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
        self._call("stop", workspace_id)
        self.running.pop(str(workspace_id), None)
        return {}

    def remove(self, workspace_id: UUID, state: State) -> None:
        self._call("remove", workspace_id)
        self.running.pop(str(workspace_id), None)
        self.configs.pop(str(workspace_id), None)

    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        hook = self.during.get("status")  # not recorded in calls: a read, asked by repairs
        if hook is not None:
            hook()
        running = str(workspace_id) in self.running
        return InstanceStatus(exists=running, running=running)

    def logs(self, workspace_id: UUID, state: State, tail: int, max_bytes: int) -> str:
        if self.unavailable:
            raise BackendUnavailable(self.name, self.unavailable)
        lines = self.output.get(str(workspace_id), [])
        return "\n".join(lines[-tail:]) if tail > 0 else ""

    async def follow_logs(
        self,
        workspace_id: UUID,
        state: State,
        *,
        tail: int,
        max_bytes: int,
        max_line_bytes: int,
        poll_seconds: float,
    ) -> AsyncIterator[LogItem]:
        """Follows ``output`` (lines appended by the test) and ``running`` (a new generation is a
        new instance), as the real followers follow a file or an engine."""
        key = str(workspace_id)
        lines = LineSplitter(max_line_bytes)
        if self.unavailable:
            raise BackendUnavailable(self.name, self.unavailable)
        sent = len(self.output.get(key, []))
        for text in self.output.get(key, [])[max(0, sent - tail) :] if tail > 0 else []:
            yield lines.feed(text.encode() + b"\n")[0]
        generation = self.running.get(key)
        if generation is None:
            yield InstanceNotice(InstanceChange.GONE, "no instance")
        while True:
            await asyncio.sleep(poll_seconds)
            if self.unavailable:
                raise BackendUnavailable(self.name, self.unavailable)
            output = self.output.get(key, [])
            if len(output) < sent:
                yield InstanceNotice(InstanceChange.TRUNCATED, "the output was cut")
                sent = 0
            for text in output[sent:]:
                yield lines.feed(text.encode() + b"\n")[0]
            sent = len(output)
            now = self.running.get(key)
            if now != generation:
                if now is None:
                    yield InstanceNotice(InstanceChange.GONE, "the instance stopped")
                elif generation is None:
                    yield InstanceNotice(InstanceChange.STARTED, f"generation {now}")
                else:
                    yield InstanceNotice(InstanceChange.RESTARTED, f"generation {now}")
                generation = now

    def list_instances(self) -> list[InstanceInfo]:
        return [
            InstanceInfo(workspace_id=ws, running=True, generation=generation)
            for ws, generation in self.running.items()
        ]


@contextmanager
def fake_backend() -> Iterator[FakeBackend]:
    """Register a FakeBackend under the name ``fake`` for the duration of the block."""
    fake = FakeBackend()
    backends.FACTORIES["fake"] = lambda: fake
    backends.reset_backends()
    try:
        yield fake
    finally:
        backends.FACTORIES.pop("fake", None)
        backends.reset_backends()


def any_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


SCRIPT_KEY = "test-scripted-backend:{}"


class ScriptedBackend(FakeBackend):
    """A FakeBackend that runs inside real worker processes (registered there by
    ``EXTRA_BACKEND_FACTORIES`` in tests/settings.py under the name ``scripted``).

    A test writes a script for one workspace into Redis (``script``): how many times a method
    raises ``TransientBackendError`` before it succeeds, how long it sleeps, and whether the
    process stops itself (SIGSTOP) when the lifecycle asks ``config_in_image`` (``pause:config``:
    right after ``prepare`` returned and its lease confirmation, before the next backend call);
    the first process to get there stops, once, and records its pid (``paused_pid``). Every call
    is counted in the same hash, so the test sees what every worker child did.
    """

    name = "scripted"

    def config_in_image(self, spec: LaunchSpec) -> bool:
        from workspaces.redis_client import get_redis

        redis, key = get_redis(), SCRIPT_KEY.format(spec.workspace_id)
        if redis.hget(key, "pause:config") and cast(int, redis.hincrby(key, "paused", 1)) == 1:
            redis.hset(key, "paused_pid", str(os.getpid()))
            # The whole process stops here, its lease renewer too, until the test's SIGCONT.
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().config_in_image(spec)

    def _call(self, method: str, workspace_id: UUID | str) -> None:
        super()._call(method, workspace_id)
        from workspaces.redis_client import get_redis

        redis, key = get_redis(), SCRIPT_KEY.format(workspace_id)
        calls = cast(int, redis.hincrby(key, f"calls:{method}", 1))
        raw = cast(list[bytes | None], redis.hmget(key, [f"transient:{method}", f"sleep:{method}"]))
        transient, sleep = (int(value) if value is not None else 0 for value in raw)
        if sleep:
            time.sleep(sleep)  # a soft time limit interrupts this
        if calls <= transient:
            raise TransientBackendError(f"scripted transient failure {calls} of {method}")


def scripted_backend() -> ScriptedBackend:
    return ScriptedBackend()


def script(workspace_id: UUID | str, **fields: int) -> None:
    """``script(id, **{"transient:prepare": 3, "sleep:start": 30})``."""
    from workspaces.redis_client import get_redis

    get_redis().hset(SCRIPT_KEY.format(workspace_id), mapping=fields)


def scripted_state(workspace_id: UUID | str) -> dict[str, str]:
    """The workspace's whole script hash: its steps, every method's call count, the pause."""
    from workspaces.redis_client import get_redis

    raw = cast(dict[bytes, bytes], get_redis().hgetall(SCRIPT_KEY.format(workspace_id)))
    return {key.decode(): value.decode() for key, value in raw.items()}


def scripted_calls(workspace_id: UUID | str, method: str) -> int:
    from workspaces.redis_client import get_redis

    value = cast(bytes | None, get_redis().hget(SCRIPT_KEY.format(workspace_id), f"calls:{method}"))
    return int(value or 0)
