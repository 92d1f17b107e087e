"""This platform's side of the peer comparison: its round (``POST /api/workspaces/`` N times at
once, polled with ``GET /api/workspaces/?status=online`` until all N are online) on the
platform ``bench.stack.platform`` started. A workspace is up at its ``WORKSPACE_ONLINE`` event
(the agent's registration, after which the proxy serves it); its phases come from its rows and
events."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import postgres_backends, setup_django
from bench.engine import cpu_by_root, cpu_seconds, processes
from bench.peer.rounds import Run, requests_and_watch
from bench.stack import Platform, platform, private_redis

DATABASE = "ws_peer_bench"  # unless DATABASE_URL names one


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


def here_round(
    stack: Platform,
    n: int,
    interval: float,
    workspaces: Callable[[], dict[int, float]] | None = None,
) -> Run:
    """One round here. ``workspaces`` (pid -> CPU seconds of the workspaces' own processes) takes
    the engine's place when the workspaces are local processes."""
    from django.db import connection

    from workspaces.models import Workspace

    database = str(connection.settings_dict["NAME"])
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
    online, began = first_events(list(sent), "ONLINE"), first_events(list(sent), "PROVISIONING")
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
    from workspaces.models import WorkspaceEvent
    from workspaces.status import EventType

    rows = (
        WorkspaceEvent.objects.filter(workspace_id__in=ids, type=getattr(EventType, kind))
        # Newest first, so the dict keeps each workspace's first event of the kind.
        .order_by("-created_at")
        .values_list("workspace_id", "created_at")
    )
    return {str(workspace_id): at.timestamp() for workspace_id, at in rows}
