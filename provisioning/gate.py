"""The per-workspace gate: the only code that touches the lifecycle lock.

One Redis lock per workspace id (redis-py's ``Lock``: ``SET NX PX`` with a random token, release
and extend by Lua scripts that check the token, so only the owner can release or renew). The lease
is renewed by a background thread while the cycle runs; a holder that dies stops renewing and the
gate frees itself within ``GATE_LEASE_SECONDS``.

The lock only saves work. Correctness comes from PostgreSQL: each cycle bumps the workspace's
``generation`` under the gate and conditions every write on it, so a holder whose lease expired
changes nothing (see ``workspaces.services``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

from django.conf import settings
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock

from provisioning.redis_client import get_redis
from workspaces import services

logger = logging.getLogger(__name__)


class GateBusy(Exception):
    """Another holder runs a cycle for this workspace; try again later."""


class LeaseExpired(services.LeaseLost):
    """This holder's lease ran out (or was taken over): it must not touch the backend again."""


def gate_key(workspace_id: UUID | str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:{workspace_id}"


def _held_key(holder: str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:held:{holder}"


def default_holder() -> str:
    return f"{os.path.basename(os.environ.get('_', 'python'))}@{socket.gethostname()}"


@dataclass
class Lease:
    workspace_id: str
    holder: str
    lock: Lock
    lease_seconds: int
    acquired_at: float = field(default_factory=time.time)
    generation: int | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def token(self) -> str:
        value = self.lock.local.token
        return value.decode() if isinstance(value, bytes) else str(value)

    def set_generation(self, generation: int) -> None:
        self.generation = generation
        _record_held(self)

    def confirm(self) -> bool:
        """Whether this holder still owns the gate, renewing the lease to its full length.

        Called right before each backend call and, under the workspace's row lock, before a cycle
        bumps the generation: a holder that was paused past its lease learns it here instead of
        acting on a workspace someone else now owns.
        """
        if self.lost.is_set():
            return False
        try:
            self.lock.reacquire()
        except LockNotOwnedError:
            self.lost.set()
            return False
        except RedisError as exc:
            # Cannot tell: act as if lost. The cycle stops; PostgreSQL keeps the row consistent
            # and the intent stays pending for the next converge.
            logger.warning("gate for %s could not be confirmed: %s", self.workspace_id, exc)
            return False
        return True

    def ensure(self) -> None:
        """Raise ``LeaseExpired`` unless this holder still owns the gate (see ``confirm``)."""
        if not self.confirm():
            raise LeaseExpired(f"gate lease for workspace {self.workspace_id} was lost")

    def _renew_forever(self) -> None:
        interval = max(self.lease_seconds / 3.0, 0.5)
        while not self._stop.wait(interval):
            try:
                # reacquire() resets the TTL to the full lease, only if we still own the lock.
                self.lock.reacquire()
            except LockNotOwnedError:
                logger.warning("gate lease lost for workspace %s", self.workspace_id)
                self.lost.set()
                return
            except RedisError as exc:
                # Transient: keep trying until the lease runs out; PostgreSQL fencing keeps
                # a holder that lost the lock from writing anything.
                logger.warning("gate renewal failed for %s: %s", self.workspace_id, exc)


def _record_held(lease: Lease) -> None:
    meta = {
        "workspace_id": lease.workspace_id,
        "generation": lease.generation,
        "acquired_at": lease.acquired_at,
        "pid": os.getpid(),
        "token": lease.token,
    }
    try:
        pipe = get_redis().pipeline()
        pipe.hset(_held_key(lease.holder), lease.workspace_id, json.dumps(meta))
        pipe.expire(_held_key(lease.holder), max(lease.lease_seconds * 10, 3600))
        pipe.execute()
    except RedisError as exc:  # bookkeeping for `inspect`; never fail a cycle over it
        logger.warning("could not record gate for %s: %s", lease.workspace_id, exc)


def _forget_held(lease: Lease) -> None:
    try:
        get_redis().hdel(_held_key(lease.holder), lease.workspace_id)
    except RedisError as exc:
        logger.warning("could not forget gate for %s: %s", lease.workspace_id, exc)


@contextmanager
def hold(workspace_id: UUID | str, holder: str | None = None) -> Iterator[Lease]:
    """Hold the workspace's gate for the duration of the block, or raise ``GateBusy`` at once.

    Never blocks: a caller that finds the gate busy is expected to come back later (the Celery
    task retries with a countdown), so no worker or HTTP request waits on a lock.
    """
    lease_seconds = int(settings.GATE_LEASE_SECONDS)
    lock = get_redis().lock(
        gate_key(workspace_id), timeout=lease_seconds, blocking=False, thread_local=False
    )
    if not lock.acquire(blocking=False):
        _note_waiting(workspace_id, lease_seconds)
        raise GateBusy(str(workspace_id))
    _observe_wait(workspace_id)
    lease = Lease(str(workspace_id), holder or default_holder(), lock, lease_seconds)
    _record_held(lease)
    renewer = threading.Thread(
        target=lease._renew_forever, name=f"gate-renew-{workspace_id}", daemon=True
    )
    renewer.start()
    try:
        yield lease
    finally:
        lease._stop.set()
        renewer.join(timeout=5)
        _forget_held(lease)
        try:
            lock.release()
        except LockError:
            # Expired and possibly taken by someone else: theirs now, not ours to release.
            logger.warning("gate for %s expired before release", workspace_id)


# --- Gate waits (the workspace_gate_wait_seconds histogram) -----------------------------------
# Nobody blocks on the gate: a caller that finds it held comes back later. The wait is from the
# first time a caller found it held to the next time anyone takes it, measured on Redis's clock
# (callers may run on different hosts). The mark outlives no more than a few leases.
_TAKE_WAIT = """
local started = redis.call('GET', KEYS[1])
if not started then return -1 end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(started)
"""
_MARK_WAIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('SET', KEYS[1], now, 'NX', 'PX', ARGV[1])
"""


def _waiting_key(workspace_id: UUID | str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:waiting:{workspace_id}"


def _note_waiting(workspace_id: UUID | str, lease_seconds: int) -> None:
    try:
        get_redis().eval(_MARK_WAIT, 1, _waiting_key(workspace_id), str(4 * lease_seconds * 1000))
    except RedisError as exc:  # a metric: never in the way of the gate
        logger.warning("could not note a gate wait for %s: %s", workspace_id, exc)


def _observe_wait(workspace_id: UUID | str) -> None:
    from project import metrics

    try:
        waited_ms: Any = get_redis().eval(_TAKE_WAIT, 1, _waiting_key(workspace_id))
    except RedisError as exc:
        logger.warning("could not read a gate wait for %s: %s", workspace_id, exc)
        return
    if int(waited_ms) >= 0:
        metrics.GATE_WAIT.observe(int(waited_ms) / 1000)


def is_held(workspace_id: UUID | str) -> bool:
    return bool(get_redis().exists(gate_key(workspace_id)))


def _retry_key(workspace_id: UUID | str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:retry:{workspace_id}"


def claim_retry(workspace_id: UUID | str, countdown: float) -> bool:
    """Claim the one retry slot of a busy workspace; False if a retry is already scheduled.

    Thirty requests that find the gate busy then schedule one retry between them instead of
    thirty tasks polling the gate. The slot expires on its own, so a retry lost with a dead
    worker does not block the next one for long (the redrive sweep is the last resort).
    """
    ttl_ms = int((2 * countdown + 5) * 1000)
    return bool(get_redis().set(_retry_key(workspace_id), b"1", nx=True, px=ttl_ms))


def release_retry(workspace_id: UUID | str) -> None:
    """The scheduled retry is running: the next one that finds the gate busy may schedule again."""
    get_redis().delete(_retry_key(workspace_id))


def retry_scheduled(workspace_id: UUID | str) -> bool:
    """Whether a busy-gate retry of this workspace's converge is on its way."""
    return bool(get_redis().exists(_retry_key(workspace_id)))


# How many redrive passes a redriven workspace's mark outlives (see claim_redrive).
REDRIVE_CLAIM_PASSES = 5


def _redrive_key(workspace_id: UUID | str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:redrive:{workspace_id}"


def claim_redrive(workspace_id: UUID | str) -> bool:
    """Mark the workspace as redriven; False if a redriven task of it is still queued.

    The converge task clears the mark when it starts, so the redrive sweep enqueues a workspace
    at most once while its task waits in the queue, instead of once per pass. The mark expires
    after REDRIVE_CLAIM_PASSES sweep intervals: a task that was reserved by a worker killed
    before it started comes back only after the broker's visibility timeout, and the intent
    should not wait that long. (Redis restarted empty loses the mark with the queue.)
    """
    ttl = REDRIVE_CLAIM_PASSES * int(settings.REDRIVE_INTERVAL_SECONDS)
    return bool(get_redis().set(_redrive_key(workspace_id), b"1", nx=True, ex=ttl))


def release_redrive(workspace_id: UUID | str) -> None:
    get_redis().delete(_redrive_key(workspace_id))


def gates_held_by(holder: str) -> list[dict[str, Any]]:
    """Gates currently held by ``holder`` (a worker node name): for ``inspect workspace_gates``."""
    client = get_redis()
    now = time.time()
    result = []
    held = cast(dict[bytes, bytes], client.hgetall(_held_key(holder)))
    for raw in held.values():
        meta = json.loads(raw)
        current = cast(bytes | None, client.get(gate_key(meta["workspace_id"])))
        if current is None or current.decode() != meta.get("token"):
            continue  # released or expired since it was recorded
        result.append(
            {
                "workspace_id": meta["workspace_id"],
                "generation": meta.get("generation"),
                "held_seconds": round(now - float(meta["acquired_at"]), 3),
                "pid": meta.get("pid"),
            }
        )
    return sorted(result, key=lambda item: item["workspace_id"])
