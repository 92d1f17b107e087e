"""The backend contract: what the lifecycle asks of a place that runs workspaces.

Modelled on JupyterHub's Spawner: every method is idempotent and says what it returns. ``state``
is an opaque JSON-able dict the backend returns and the platform persists on the workspace row
(``backend_state``) and hands back on the next call; the backend must also be able to find its
instance without it (fixed names, labels, pid files), because a killed worker may have started an
instance whose state was never saved.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import UUID

from provisioning.manifests import Template

State = dict[str, Any]
CONFIG_MARKER = ".provisioned"


class BackendError(Exception):
    """A backend operation failed for a reason retrying will not fix. The message is user-facing."""


class TransientBackendError(BackendError):
    """A backend operation failed for a reason that may go away (engine busy, timeout)."""


class BackendUnavailable(BackendError):
    """The backend is unknown, not configured or not reachable."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"workspace backend {backend!r} is unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class ConfigState(enum.Enum):
    EMPTY = "empty"  # no .provisioned marker: nothing, or a half-written copy
    PROVISIONED = "provisioned"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to run one cycle's instance. ``env`` holds secrets: never log it."""

    workspace_id: UUID
    generation: int
    template: Template
    env: Mapping[str, str] = field(repr=False)

    @property
    def name(self) -> str:
        return f"ws-{self.workspace_id}"


@dataclass(frozen=True)
class InstanceStatus:
    exists: bool
    running: bool
    exit_code: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class InstanceInfo:
    """One instance found by listing the backend (for reconciliation and orphan removal)."""

    workspace_id: str
    running: bool
    generation: int | None = None
    ref: str = ""
    exit_code: int | None = None


class WorkspaceBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def check_available(self) -> None:
        """Return if the backend can run workspaces now; raise ``BackendUnavailable`` otherwise."""

    @abstractmethod
    def prepare(self, spec: LaunchSpec, state: State) -> State:
        """Make the instance's resources exist (config volume; for Docker, a created but not
        started container), replacing leftovers of earlier cycles. Returns the new state.
        ``spec.env`` is complete here (agent token included), so an instance whose environment
        is fixed at creation is created once per cycle. Idempotent."""

    @abstractmethod
    def config_state(self, spec: LaunchSpec, state: State) -> ConfigState:
        """Whether the config volume holds a completed copy (the ``.provisioned`` marker)."""

    @abstractmethod
    def write_config(self, spec: LaunchSpec, state: State, files: Mapping[str, bytes]) -> None:
        """Write ``files`` (relative path -> bytes) into the config volume, then the marker, so
        an interrupted copy reads as EMPTY. Idempotent."""

    @abstractmethod
    def start(self, spec: LaunchSpec, state: State) -> State:
        """Run the instance for ``spec.generation``; an instance of an earlier cycle is replaced,
        never duplicated. Returns the new state once the backend reports it running."""

    @abstractmethod
    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
        """Stop the workspace's instance: SIGTERM, then SIGKILL after ``grace_seconds``.
        Stopping what is already stopped or gone is a no-op. Returns the new state."""

    @abstractmethod
    def remove(self, workspace_id: UUID, state: State) -> None:
        """Delete the instance and its config volume. Not found means done."""

    @abstractmethod
    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        """What the backend says about the workspace's instance now."""

    @abstractmethod
    def list_instances(self) -> list[InstanceInfo]:
        """Every instance this backend holds for the platform (running or exited), in one call
        or as few as possible: the reconciler calls it once per pass, whatever the number of
        workspaces. ``InstanceInfo.workspace_id`` is the id the instance is labelled with; it may
        name a workspace the platform no longer knows (an orphan)."""

    def remove_orphan(self, instance: InstanceInfo) -> None:
        """Delete an instance labelled for a workspace that is removed or unknown, and its config
        volume. Not found means done. The default removes by the labelled workspace id, which is
        how every backend here names its resources; a backend whose instances can carry a label
        that is not a workspace id overrides this and removes by ``instance.ref``."""
        self.remove(UUID(instance.workspace_id), {})
