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

import functools
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

from django.conf import settings
from redis.exceptions import LockNotOwnedError, RedisError
from redis.lock import Lock

from workspaces import metrics, services
from workspaces.redis_client import get_redis

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
    # time.monotonic() when the last successful confirmation (or the acquisition) was sent: the
    # lease ran its full length from no earlier than that moment.
    confirmed_at: float = field(default_factory=time.monotonic)

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
        sent = time.monotonic()
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
        self.confirmed_at = sent
        return True

    def call_begins(self) -> None:
        """A backend call begins: no confirmation made before it stands for one after it."""
        self.confirmed_at = -math.inf

    def ensure(self, *, unless_within: float = 0.0) -> None:
        """Raise ``LeaseExpired`` unless this holder still owns the gate (see ``confirm``).

        ``unless_within``: a confirmation that succeeded less than that many seconds ago (on the
        monotonic clock, which counts a pause too), with no backend call begun since
        (``call_begins``), stands, with no round trip. It renewed the lease to its full
        ``GATE_LEASE_SECONDS``, so the lease cannot have run out since; the lifecycle uses it for
        the confirmation before a backend call that follows the previous call's confirmation at
        once (``lifecycle._confirmed``)."""
        fresh = unless_within and time.monotonic() - self.confirmed_at < unless_within
        if fresh and not self.lost.is_set():
            return
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


def _held_meta(lease: Lease, token: str) -> str:
    """What ``inspect workspace_gates`` reads of a held gate (``gates_held_by``)."""
    meta = {
        "workspace_id": lease.workspace_id,
        "generation": lease.generation,
        "acquired_at": lease.acquired_at,
        "pid": os.getpid(),
        "token": token,
    }
    return json.dumps(meta)


def _held_ttl(lease: Lease) -> int:
    return max(lease.lease_seconds * 10, 3600)


def _record_held(lease: Lease) -> None:
    try:
        pipe = get_redis().pipeline()
        pipe.hset(_held_key(lease.holder), lease.workspace_id, _held_meta(lease, lease.token))
        pipe.expire(_held_key(lease.holder), _held_ttl(lease))
        pipe.execute()
    except RedisError as exc:  # bookkeeping for `inspect`; never fail a cycle over it
        logger.warning("could not record gate for %s: %s", lease.workspace_id, exc)


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
    lease = Lease(str(workspace_id), holder or default_holder(), lock, lease_seconds)
    # redis-py's lock with the token redis-py would draw; taken by ``_acquire`` in the round trip
    # that also records the holder and ends a wait (or marks one), so that the lock's own
    # renewal and release (``reacquire``, ``release``) work on it as if ``acquire`` had run.
    token = uuid.uuid1().hex.encode()
    if not _acquire(lease, token):
        raise GateBusy(str(workspace_id))
    lock.local.token = token
    renewer = threading.Thread(
        target=lease._renew_forever, name=f"gate-renew-{workspace_id}", daemon=True
    )
    renewer.start()
    try:
        yield lease
    finally:
        lease._stop.set()
        renewer.join(timeout=5)
        if not _release(lease, token):
            # Expired and possibly taken by someone else: theirs now, not ours to release.
            logger.warning("gate for %s expired before release", workspace_id)


# --- Taking and releasing the gate, each in one round trip -----------------------------------
# Gate waits (the workspace_gate_wait_seconds histogram): nobody blocks on the gate, a caller
# that finds it held comes back later. The wait is from the first time a caller found it held to
# the next time anyone takes it, measured on Redis's clock (callers may run on different hosts).
# The mark outlives no more than a few leases.
#
# KEYS: the gate, the wait mark, the holder's record. ARGV: the token, the lease (ms), the
# workspace id, the record, its TTL (s), the mark's TTL (ms). Returns {1, ms waited or -1} when
# taken (the holder recorded for ``inspect``), {0} when held (the wait marked).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  local started = redis.call('GET', KEYS[2])
  if not started then return {1, -1} end
  redis.call('DEL', KEYS[2])
  return {1, now - tonumber(started)}
end
redis.call('SET', KEYS[2], now, 'NX', 'PX', ARGV[6])
return {0}
"""
# KEYS: the gate, the holder's record. ARGV: the token, the workspace id. The lock goes only if
# the token is still this holder's (as redis-py's release checks); 1 when it went.
_RELEASE = """
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _waiting_key(workspace_id: UUID | str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:waiting:{workspace_id}"


def _acquire(lease: Lease, token: bytes) -> bool:
    """Take the gate with ``token`` and record the holder, ending a wait; or mark the wait."""
    keys = [gate_key(lease.workspace_id), _waiting_key(lease.workspace_id), _held_key(lease.holder)]
    args = [
        token,
        lease.lease_seconds * 1000,
        lease.workspace_id,
        _held_meta(lease, token.decode()),
        _held_ttl(lease),
        4 * lease.lease_seconds * 1000,
    ]
    taken: Any = _script(_ACQUIRE)(keys, args)
    if not int(taken[0]):
        return False
    if int(taken[1]) >= 0:
        metrics.GATE_WAIT.observe(int(taken[1]) / 1000)
    return True


def _release(lease: Lease, token: bytes) -> bool:
    keys = [gate_key(lease.workspace_id), _held_key(lease.holder)]
    return bool(_script(_RELEASE)(keys, [token, lease.workspace_id]))


def _script(source: str) -> Any:
    """The script on the current client (EVALSHA; loaded again when Redis lost it)."""
    return _registered(get_redis(), source)


@functools.lru_cache(maxsize=16)
def _registered(client: Any, source: str) -> Any:
    return client.register_script(source)


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
