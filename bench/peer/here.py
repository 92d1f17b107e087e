"""This platform's side of the peer comparison: its round (``POST /api/workspaces/`` N times at
once, polled with ``GET /api/workspaces/?status=online`` until all N are online) on the
platform ``bench.stack.platform`` started. A workspace is up at its ``WORKSPACE_ONLINE`` event
(the agent's registration, after which the proxy serves it); its phases come from its rows and
events."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import postgres_backends, setup_django
from bench.engine import cpu_by_root, cpu_seconds, processes
from bench.peer.rounds import Run, requests_and_watch
from bench.stack import Platform, platform, private_redis, ready_pool_members, wait_until

if TYPE_CHECKING:
    from django.db.models import QuerySet

DATABASE = "ws_peer_bench"  # unless DATABASE_URL names one
TEMPLATE = "shell-default"  # what each request here creates
POOL_TIMEOUT = 600.0


def with_pool(size: int) -> None:
    """Give ``TEMPLATE`` a warm pool of ``size`` (the operator's override), for this process and
    the platform it starts; call it before ``own_redis``."""
    os.environ["WORKSPACE_POOL_SIZES"] = f"{TEMPLATE}={size}"


def wait_for_pool(size: int, backend: str) -> None:
    """Until ``size`` members of the pool are ready on ``backend`` (the beat sweep and the
    claims' refills fill it)."""

    def full() -> bool:
        return ready_pool_members(TEMPLATE, backend) >= size

    wait_until(full, POOL_TIMEOUT, f"{size} ready pool members", interval=0.2)


def pg_backends(database: str) -> dict[int, float]:
    """pid -> CPU seconds of the PostgreSQL backends connected to ``database``."""
    snapshot = processes()
    return {pid: snapshot[pid].cpu for pid in postgres_backends(database) if pid in snapshot}


@contextlib.contextmanager
def own_redis(log_dir: Path) -> Iterator[int]:
    """A Redis of the platform's own (so that its CPU is counted with the platform's), and Django
    set up in this process on it and the bench's database; yields the Redis server's pid."""
    with private_redis(log_dir) as redis_pid:
        setup_django(DATABASE, redis_db=9)
        yield redis_pid


@contextlib.contextmanager
def here_platform(log_dir: Path, backend: str, redis_pid: int) -> Iterator[Platform]:
    """This platform on ``backend`` as ``bin/run`` starts it, from the Procfile's lines (see
    ``bench.peer``), on the Redis of ``own_redis``."""
    with platform("peer", log_dir, backend=backend, proxy=True, procfile=True) as stack:
        stack.redis_pid = redis_pid
        yield stack


def here_clean(stack: Platform, backend: str) -> None:
    """Remove every workspace of the bench's user through ``backend`` (its instance, link and
    folders or volume), then its rows. A warm pool's members have another owner: they stay."""
    from workspaces.models import Workspace

    _remove_rows(Workspace.objects.filter(owner__username=stack.owner), backend)


def remove_pool_members(backend: str) -> None:
    """Remove the warm pool's members (``--pool``) with their instances, before a run and after
    it: a run without the pool would otherwise spend its rounds retiring them."""
    from workspaces.models import Workspace

    _remove_rows(Workspace.objects.exclude(pool=""), backend)


def _remove_rows(rows: QuerySet[Any], backend: str) -> None:
    from provisioning.backends import backend_named

    engine = backend_named(backend, check=False)
    listed = list(rows.values_list("id", "backend_state"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda row: engine.remove(row[0], row[1] or {}), listed))
    rows.delete()


def here_round(
    stack: Platform,
    n: int,
    interval: float,
    workspaces: Callable[[], dict[int, float]] | None = None,
    pool: int = 0,
) -> Run:
    """One round here. ``workspaces`` (pid -> CPU seconds of the workspaces' own processes) takes
    the engine's place when the workspaces are local processes. With a ``pool`` (its size), the
    round begins from a full pool (untimed), and its CPU is read once the pool is full again:
    each workspace's figure includes the start of the member that replaces the one it took."""
    from django.db import connection

    from workspaces.models import Workspace

    database = str(connection.settings_dict["NAME"])
    if pool:
        wait_for_pool(pool, stack.env["WORKSPACE_BACKEND"])
    tag = uuid.uuid4().hex[:6]
    before = cpu_seconds(stack.pids)
    redis = {"redis": stack.redis_pid} if stack.redis_pid else {}
    parts_before = cpu_by_root({**stack.parts, **redis})
    pg_before = pg_backends(database)
    own_before = workspaces() if workspaces else {}

    def create(index: int) -> tuple[str, float]:
        sent = time.time()
        return stack.create_workspace(f"w{tag}-{index}"), sent

    def count() -> int:
        status, body = stack.request("GET", "/api/workspaces/?status=online&page_size=500")
        return len(body.get("results", [])) if status == 200 else 0

    def failed() -> list[str]:
        rows = Workspace.objects.filter(owner__username=stack.owner, status="failed")
        return [str(error) for error in rows.values_list("last_error", flat=True)]

    sent = requests_and_watch(n, create, count, failed, interval, f"here N={n}")
    if pool:
        wait_for_pool(pool, stack.env["WORKSPACE_BACKEND"])
    after = cpu_seconds(stack.pids)
    parts_after = cpu_by_root({**stack.parts, **redis})
    pg_after = pg_backends(database)
    cpu = {
        "control": after["platform"] - before["platform"],
        **{f"control:{part}": parts_after[part] - parts_before[part] for part in stack.parts},
        "postgres": sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()),
    }
    if redis:
        cpu["redis"] = parts_after["redis"] - parts_before["redis"]
    if workspaces is None:
        cpu["engine"] = after["engine"] - before["engine"]
    else:
        own_after = workspaces()
        cpu["workspace"] = sum(cpu - own_before.get(pid, 0.0) for pid, cpu in own_after.items())
    # The newest cycle's begin: a claimed member's own first cycle began before the request.
    online, began = first_events(list(sent), "ONLINE"), last_events(list(sent), "PROVISIONING")
    running = {
        str(key): at.timestamp()
        for key, at in Workspace.objects.filter(id__in=list(sent)).values_list(
            "id", "last_started_at"
        )
        if at is not None
    }
    latencies = [online[key] - sent[key] for key in sent]
    phases = {
        "queue": [began[key] - sent[key] for key in sent],
        "cycle": [running[key] - began[key] for key in sent],
        "agent": [online[key] - running[key] for key in sent],
    }
    return Run(max(online.values()) - min(sent.values()), latencies, cpu, phases)


def first_events(ids: list[str], kind: str) -> dict[str, float]:
    """Workspace id -> when its first event of that kind was recorded."""
    return _events(ids, kind, "-created_at")


def last_events(ids: list[str], kind: str) -> dict[str, float]:
    """Workspace id -> when its latest event of that kind was recorded."""
    return _events(ids, kind, "created_at")


def _events(ids: list[str], kind: str, order: str) -> dict[str, float]:
    from workspaces.models import WorkspaceEvent
    from workspaces.status import EventType

    rows = (
        WorkspaceEvent.objects.filter(workspace_id__in=ids, type=getattr(EventType, kind))
        # The dict keeps each workspace's last row in this order.
        .order_by(order)
        .values_list("workspace_id", "created_at")
    )
    return {str(workspace_id): at.timestamp() for workspace_id, at in rows}
