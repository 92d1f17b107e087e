"""A warm pool's member on the process backend (docs/architecture.md "Warm pools"): its agent
boots, says it waits by the ready file, and reads its claim (identity, token, env) from the claim
file, both in the workspace's own 0700 home, when SIGUSR1 wakes it."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from provisioning.backends import process_launch
from provisioning.backends.base import BackendError

# How long a pool member's agent may take to wait for its claim (an interpreter's start).
READY_SECONDS = 10.0


def claim_file(home: Path) -> Path:
    return home / ".workspace-claim"


def ready_file(home: Path) -> Path:
    claim = claim_file(home)
    return claim.with_name(claim.name + ".ready")  # where the agent puts it


def wait_ready(home: Path, pid: int, start_time: int | None) -> None:
    """A member is ready once its agent waits for the claim's signal (it blocked SIGUSR1 first:
    a claim signalled earlier would end it, since the default action terminates)."""
    ready = ready_file(home)
    deadline = time.monotonic() + READY_SECONDS
    while not ready.exists():
        if not process_launch.alive(pid, start_time):
            raise BackendError("the pool member's agent exited before it was ready; see agent.log")
        if time.monotonic() > deadline:
            raise BackendError(f"the pool member's agent was not ready in {READY_SECONDS} s")
        time.sleep(0.005)


def hand_over(
    home: Path, pid: int | None, start_time: int | None, uid: int | None, env: dict[str, str]
) -> None:
    """Write the claim (JSON) owned by the member's ``uid``, mode 0600, by rename so the agent
    never reads half of it; then SIGUSR1 wakes it. Only that uid (and root) can read it; the
    agent deletes it once read."""
    if pid is None or not process_launch.alive(pid, start_time):
        raise BackendError("the pool member's agent is not running")
    if not ready_file(home).exists():
        raise BackendError("the pool member's agent is not waiting for a claim")
    target = claim_file(home)
    partial = target.with_name(target.name + ".tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        if uid is not None:
            os.fchown(handle.fileno(), uid, uid)
        handle.write(json.dumps(env).encode())
    os.replace(partial, target)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError as exc:
        target.unlink(missing_ok=True)
        raise BackendError("the pool member's agent exited before its claim") from exc
