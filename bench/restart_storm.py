"""Restart storm on Docker: 50 concurrent ``POST /api/workspaces/{id}/restart/`` on one online
workspace, through the same gunicorn + Celery worker + engine as the provisioning bench.

* **cycles**: ``WORKSPACE_PROVISIONING`` events the storm caused (each is one cycle: a container
  replaced). The gate coalesces: requests that arrive while a cycle runs cause at most one more.
  Counted after the workspace settled plus a quiet period longer than the busy-gate retry, so a
  late cycle would be seen. Floor: the cycles of one single restart (1).
* **settle**: the first restart request sent to the workspace back ``online`` with no pending
  intent (``handled_seq == requested_seq``), polled every 20 ms. Floor: one single restart of
  the same workspace timed the same way, in the same run.

    .venv/bin/python -m bench.restart_storm [repeats]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import Figure, print_figures, setup_django
from bench.stack import Platform, platform, remove_labelled, wait_until

STORM = 50
TIMEOUT = 300.0


def _settled(workspace_id: str, generation_after: int) -> bool:
    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    row = Workspace.objects.filter(id=workspace_id).values(
        "status", "generation", "requested_seq", "handled_seq", "last_error"
    )[0]
    if row["status"] == WorkspaceStatus.FAILED:
        raise RuntimeError(f"the workspace failed: {row['last_error']}")
    return bool(
        row["status"] == WorkspaceStatus.ONLINE
        and row["generation"] > generation_after
        and row["handled_seq"] >= row["requested_seq"]
    )


def _cycles_since(workspace_id: str, generation: int) -> int:
    from workspaces.models import WorkspaceEvent
    from workspaces.status import EventType

    return WorkspaceEvent.objects.filter(
        workspace_id=workspace_id, type=EventType.PROVISIONING, generation__gt=generation
    ).count()


def _generation(workspace_id: str) -> int:
    from workspaces.models import Workspace

    return int(Workspace.objects.filter(id=workspace_id).values_list("generation", flat=True)[0])


def restart(stack: Platform, workspace_id: str, requests: int) -> tuple[float, int, int, float]:
    """Send ``requests`` restarts together; returns (settle seconds, cycles, requests refused,
    seconds from the first request sent to the last one answered)."""
    from django.conf import settings

    before = _generation(workspace_id)
    barrier = threading.Barrier(requests)
    sent: list[float] = []
    answered: list[float] = []

    def one(_: int) -> int:
        barrier.wait()
        sent.append(time.time())
        status, _body = stack.request("POST", f"/api/workspaces/{workspace_id}/restart/")
        answered.append(time.time())
        return status

    with ThreadPoolExecutor(max_workers=requests) as pool:
        statuses = list(pool.map(one, range(requests)))
    refused = sum(status != 202 for status in statuses)
    wait_until(lambda: _settled(workspace_id, before), TIMEOUT, "the workspace to settle")
    settle = time.time() - min(sent)
    # Long enough for a busy-gate retry to come back and run a cycle if one were still owed.
    time.sleep(settings.GATE_BUSY_RETRY_SECONDS + 1.5)
    if not _settled(workspace_id, before):
        wait_until(lambda: _settled(workspace_id, before), TIMEOUT, "the workspace to settle")
    return settle, _cycles_since(workspace_id, before), refused, max(answered) - min(sent)


def run(repeats: int = 3) -> list[Figure]:
    from bench.engine import ensure_agent_image, ensure_engine

    ensure_engine()
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    setup_django("ws_restart_storm_bench", redis_db=10)

    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    ensure_agent_image()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-restart-storm-"))
    settle, single, cycles, single_cycles = [], [], [], []
    refused_total = 0
    spreads: list[float] = []
    with platform("restart-storm", log_dir) as stack:
        Workspace.objects.filter(owner__username=stack.owner).delete()
        try:
            workspace_id = stack.create_workspace(f"storm-{uuid.uuid4().hex[:8]}")
            wait_until(
                lambda: Workspace.objects.filter(
                    id=workspace_id, status=WorkspaceStatus.ONLINE
                ).exists(),
                TIMEOUT,
                "the workspace online",
            )
            restart(stack, workspace_id, 1)  # warm-up, untimed
            for repeat in range(repeats):
                order = ["single", "storm"] if repeat % 2 == 0 else ["storm", "single"]
                for kind in order:
                    seconds, ran, refused, spread = restart(
                        stack, workspace_id, STORM if kind == "storm" else 1
                    )
                    refused_total += refused
                    if kind == "storm":
                        spreads.append(spread)
                    (settle if kind == "storm" else single).append(seconds)
                    (cycles if kind == "storm" else single_cycles).append(float(ran))
                    print(
                        f"# repeat {repeat + 1} {kind}: settle {seconds:.2f} s, {ran} cycles, "
                        f"{refused} refused",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            remove_labelled(stack.label)
            Workspace.objects.filter(owner__username=stack.owner).delete()
    headline = (
        f"{STORM} concurrent restarts of one workspace ran "
        f"{statistics.median(cycles):.0f} cycles (median) and settled in "
        f"{statistics.median(settle):.2f} s; one restart takes {statistics.median(single):.2f} s"
    )
    return [
        Figure(
            name=f"restart storm ({STORM} concurrent restarts): cycles run",
            unit="cycles",
            samples=cycles,
            floor_name="one restart",
            floor_samples=single_cycles,
            notes=(
                f"requests refused (not 202) over all storms: {refused_total}; the {STORM} "
                f"requests took {statistics.median(spreads):.2f} s (median) from the first sent "
                "to the last answered, so a cycle that begins meanwhile leaves later requests "
                "to the next one"
            ),
            extra={"headline": headline},
        ),
        Figure(
            name=f"restart storm ({STORM} concurrent restarts): time to settle",
            unit="s",
            samples=settle,
            floor_name="one restart, same workspace",
            floor_samples=single,
        ),
    ]


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
