"""A fake backend that implements the real contract, for orchestration tests.

It keeps instances in memory and records every call, so a test can assert what the lifecycle
asked of the backend (e.g. preflight never calls it). Tests of the real backends use the real
process backend or a real Docker engine, never this.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from provisioning import backends
from provisioning.backends.base import (
    BackendError,
    BackendUnavailable,
    ConfigState,
    InstanceInfo,
    InstanceStatus,
    LaunchSpec,
    State,
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

    def _call(self, method: str, workspace_id: UUID | str) -> None:
        with self.lock:
            self.calls.append((method, str(workspace_id)))

    def calls_for(self, workspace_id: UUID | str) -> list[str]:
        return [method for method, ws in self.calls if ws == str(workspace_id)]

    def check_available(self) -> None:
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
        running = str(workspace_id) in self.running
        return InstanceStatus(exists=running, running=running)

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
