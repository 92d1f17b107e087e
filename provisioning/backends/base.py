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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import UUID

from workspaces.manifests import Template

State = dict[str, Any]
CONFIG_MARKER = ".provisioned"
# In a config volume the engine filled from a config image: the copy is new and the agent has not
# yet reported it (it does at registration, then removes the file).
CONFIG_COPIED = ".config-copied"


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


class SandboxUnavailable(BackendUnavailable):
    """The backend cannot run the workspace's sandbox (``Workspace.sandbox``): a backend without
    container runtimes, or an engine that lacks the runtime. The start cycle fails at preflight
    naming it; nothing falls back to another runtime."""

    def __init__(
        self, backend: str, sandbox: str, reason: str, container_runtime: str = ""
    ) -> None:
        super().__init__(backend, reason)
        self.args = (f"sandbox {sandbox!r} is unavailable on the {backend} backend: {reason}",)
        self.sandbox = sandbox
        # The engine's name of the runtime that was looked for ("runsc"), when there is one.
        self.container_runtime = container_runtime


def last_lines(data: bytes, tail: int, max_bytes: int) -> str:
    """The last ``tail`` lines of ``data``, cut to its last ``max_bytes``, decoded leniently."""
    if tail <= 0:
        return ""
    data = data[-max_bytes:]
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[-tail:])


@dataclass(frozen=True)
class LogLine:
    """One line of a followed instance's output, without its newline; ``truncated`` when it was
    longer than the follower's ``max_line_bytes`` (the rest of the line is dropped)."""

    text: str
    truncated: bool = False


class InstanceChange(enum.Enum):
    """What a follower reports about the instance it follows, between lines."""

    STARTED = "started"  # an instance appeared (there was none when following began or since)
    RESTARTED = "restarted"  # a new instance (or the same one started again) replaced the old
    EXITED = "exited"  # the instance stopped; the follower waits for the next one
    GONE = "gone"  # no instance (removed, or never created); the follower waits for one
    TRUNCATED = "truncated"  # the output was cut or rotated under the follower
    SKIPPED = "skipped"  # output arrived faster than the follower's per-read bound; some dropped


@dataclass(frozen=True)
class InstanceNotice:
    change: InstanceChange
    detail: str = ""


LogItem = LogLine | InstanceNotice


class LineSplitter:
    """Bytes in, complete lines out, each cut to ``max_line_bytes`` (the rest of an overlong
    line is dropped up to its newline, so memory stays bounded whatever the instance writes)."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max(1, max_line_bytes)
        self._partial = bytearray()
        self._overlong = False

    def feed(self, data: bytes) -> list[LogLine]:
        lines: list[LogLine] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            room = self.max_line_bytes - len(self._partial)
            piece = data[start:end]
            if len(piece) > room:
                self._partial += piece[: max(0, room)]
                self._overlong = True
            else:
                self._partial += piece
            if newline < 0:
                break
            lines.append(self._take())
            start = newline + 1
        return lines

    def flush(self) -> list[LogLine]:
        """The last line when it had no newline (the instance ended mid-line)."""
        return [self._take()] if self._partial or self._overlong else []

    def _take(self) -> LogLine:
        raw = bytes(self._partial).rstrip(b"\r")
        line = LogLine(raw.decode(errors="replace"), truncated=self._overlong)
        self._partial.clear()
        self._overlong = False
        return line


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
    # The process backend's isolation uid (and gid); None where it does not apply.
    uid: int | None = None
    # A warm pool's member: ``env`` holds only the template's part (no identity, no token, no
    # person's env) and the agent waits for ``claim`` to hand it the rest (WORKSPACE_POOL=1).
    pooled: bool = False
    # The container runtime (``Workspace.sandbox``): "runc" or "gvisor"; the selector checked
    # that the backend can run it.
    sandbox: str = "runc"

    @property
    def name(self) -> str:
        return f"ws-{self.workspace_id}"


@dataclass(frozen=True)
class InstanceStatus:
    exists: bool
    running: bool
    exit_code: int | None = None
    detail: str = ""
    # The last lines of the instance's output when it is not running (for death events).
    output_tail: str = ""


@dataclass(frozen=True)
class InstanceInfo:
    """One instance found by listing the backend (for reconciliation and orphan removal)."""

    workspace_id: str
    running: bool
    generation: int | None = None
    ref: str = ""
    exit_code: int | None = None
    # The id of the image the instance runs, where the backend has images ("" otherwise): the
    # pool sweep retires a member whose image is no longer what its template launches.
    image: str = ""


class WorkspaceBackend(ABC):
    name: ClassVar[str]
    # The sandboxes (``Workspace.sandbox``) it can run: only the Docker backend chooses a
    # container runtime; the others run every workspace one way, which counts as "runc".
    sandboxes: ClassVar[tuple[str, ...]] = ("runc",)
    # Whether ``claim`` can hand a waiting member its workspace: the pool sweep makes members
    # only on a backend that can.
    keeps_pools: ClassVar[bool] = False

    @abstractmethod
    def check_available(self) -> None:
        """Return if the backend can run workspaces now; raise ``BackendUnavailable`` otherwise."""

    def check_sandbox(self, sandbox: str) -> None:
        """Return if the backend can launch a workspace under ``sandbox`` (one of
        ``sandboxes``) now; raise ``SandboxUnavailable`` naming what is missing otherwise (the
        Docker backend asks its engine for the runtime)."""
        if sandbox not in self.sandboxes:
            raise SandboxUnavailable(self.name, sandbox, "not one of its sandboxes")

    @abstractmethod
    def prepare(self, spec: LaunchSpec, state: State) -> State:
        """Make the instance's resources exist (config volume; for Docker, a created but not
        started container), replacing leftovers of earlier cycles. Returns the new state.
        ``spec.env`` is complete here (agent token included), so an instance whose environment
        is fixed at creation is created once per cycle. Idempotent."""

    def config_in_image(self, spec: LaunchSpec) -> bool:
        """True when ``prepare`` made an instance whose config volume the engine fills from an
        image of the template's files whenever the volume is empty (a first provision, or a
        recovery), marker included; the agent reports the copy at registration. The lifecycle
        then neither reads nor writes the volume. False (the default): ``config_state`` and
        ``write_config`` do it."""
        return False

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

    def launch_image_id(self, template: Template) -> str | None:
        """The id of the image a new instance of ``template`` would run now, for comparing with
        ``InstanceInfo.image``; None when the backend has no images. An image that does not exist
        yet (a rebuilt base whose config image is still to be made) is "" : nothing running can
        be from it."""
        return None

    def claim(self, spec: LaunchSpec, state: State) -> State:
        """Hand a waiting pool member (started from a ``pooled`` spec) its workspace: write
        ``spec.env`` (identity, token, the person's env) where only its agent reads it, then
        wake the agent. Returns the new state. ``BackendError`` when the member cannot take it
        (its instance died, or this backend keeps no pools): the cycle then starts the workspace
        cold, so a pool never turns a create into an error. Called at most once per member."""
        raise BackendError(f"{self.name}: this backend keeps no warm pools")

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

    @abstractmethod
    def logs(self, workspace_id: UUID, state: State, tail: int, max_bytes: int) -> str:
        """The last ``tail`` lines the workspace's instance wrote (stdout and stderr together),
        oldest first, and never more than ``max_bytes`` (the oldest part is cut). The output of
        an exited instance is still returned until the instance is removed; ``""`` when there is
        no instance or no output. Read-only: safe to call from a web request."""

    @abstractmethod
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
        """Follow the workspace's output: first its last ``tail`` lines (as ``logs`` would give
        them, at most ``max_bytes``), then each new line as the instance writes it, as
        ``LogLine`` (cut to ``max_line_bytes``). Between lines, an ``InstanceNotice`` says when
        the instance exits, goes away, is replaced or restarted, or its output is cut; the
        follower then keeps following (the next instance's output included) and never ends by
        itself: the caller bounds it and cancels it (closing the generator).

        An async generator: waiting for output is a coroutine (an open follower holds no
        thread), and anything blocking (reading a file, a Docker SDK call) runs briefly in the
        loop's executor. ``poll_seconds`` is how often a backend that must poll looks again.
        Raises ``BackendError`` (before the first item) when the backend cannot be asked."""

    def app_address(self, workspace_id: UUID, state: State, port: int) -> str:
        """``host:port`` where the proxy reaches the workspace's app listening on ``port``.

        The one place a workspace's upstream is resolved; it reads ``state`` only (no backend
        call), so the reconciler can compute every route in memory. The default is the host's
        loopback (process backend; Docker with host networking). A backend that gives each
        instance its own address records it in its state and overrides this."""
        return f"127.0.0.1:{port}"

    def remove_orphan(self, instance: InstanceInfo) -> None:
        """Delete an instance labelled for a workspace that is removed or unknown, and its config
        volume. Not found means done. The default removes by the labelled workspace id, which is
        how every backend here names its resources; a backend whose instances can carry a label
        that is not a workspace id overrides this and removes by ``instance.ref``."""
        self.remove(UUID(instance.workspace_id), {})
