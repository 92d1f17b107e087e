"""One reconciliation pass over many workspaces, with its count of backend calls.

Scenario (per backend): ``rows`` workspaces in the database, most of them stopped with no
instance; ``real`` online with a real running instance; ``dead`` online whose instance is gone
(drift, repaired by the pass); ``orphans`` instances labelled for unknown workspaces (removed by
the pass). Each repeat restores the drift, then times one pass.

Floor, measured in the same run: the pass's unavoidable reads, one ``list_instances()`` and one
SELECT of the rows. A second figure times a pass with no drift at all against the same floor.

The backend is a parameter (``measure``): ``run`` measures the process backend; a Docker run
passes its backend and a function that starts one labelled instance.

    .venv/bin/python -m bench.reconcile
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.common import Figure, setup_django, timed

ROWS = 10_000
REAL = 5
DEAD = 5
ORPHANS = 3


class CountingBackend:
    """Wraps a backend instance and counts every contract call made through it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self.name = inner.name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if not callable(value):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[attr] += 1
            return value(*args, **kwargs)

        return counted

    def remove_orphan(self, instance: Any) -> None:
        # The contract's default calls self.remove(); count it once, as one engine operation.
        self.calls["remove_orphan"] += 1
        self._inner.remove_orphan(instance)


def _owner() -> Any:
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="bench-reconcile")
    return user


def _clear(owner: Any) -> None:
    from workspaces.models import Workspace

    Workspace.objects.filter(owner=owner).delete()


def _insert(owner: Any, backend_name: str, rows: int, running: int) -> list[uuid.UUID]:
    """Insert ``rows`` workspaces; the first ``running`` are online. Returns their ids."""
    from django.utils import timezone

    from workspaces.models import Workspace
    from workspaces.status import DesiredState, WorkspaceStatus

    now = timezone.now()
    objects = []
    for index in range(rows):
        online = index < running
        objects.append(
            Workspace(
                owner=owner,
                name=f"bench-{index:05d}",
                template="shell-default",
                runtime="shell",
                backend=backend_name,
                status=WorkspaceStatus.ONLINE if online else WorkspaceStatus.STOPPED,
                desired_state=DesiredState.RUNNING if online else DesiredState.STOPPED,
                is_running=online,
                last_started_at=now if online else None,
                last_heartbeat_at=now if online else None,
                generation=1,
                requested_seq=1,
                handled_seq=1,
            )
        )
    Workspace.objects.bulk_create(objects, batch_size=2000)
    return [workspace.id for workspace in objects[:running]]


def _restore_drift(dead: list[uuid.UUID]) -> None:
    from django.utils import timezone

    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    now = timezone.now()
    Workspace.objects.filter(id__in=dead).update(
        status=WorkspaceStatus.ONLINE, is_running=True, last_started_at=now
    )


def _floor(backend: Any) -> None:
    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    backend.list_instances()
    fields = ("id", "backend", "status", "is_running", "generation", "requested_seq")
    list(Workspace.objects.exclude(status=WorkspaceStatus.REMOVED).values_list(*fields))


def measure(
    backend: Any,
    backend_name: str,
    start_instance: Callable[[uuid.UUID], None],
    *,
    repeats: int,
    rows: int = ROWS,
    real: int = REAL,
    dead: int = DEAD,
    orphans: int = ORPHANS,
) -> list[Figure]:
    """Time one pass over ``rows`` workspaces on ``backend`` (registered as ``backend_name``),
    side by side with the floor; ``start_instance`` starts one labelled instance."""
    from provisioning.reconciler import reconcile_once

    owner = _owner()
    _clear(owner)
    running = _insert(owner, backend_name, rows, real + dead)
    real_ids, dead_ids = running[:real], running[real:]
    for workspace_id in real_ids:
        start_instance(workspace_id)

    counting = CountingBackend(backend)
    samples, floors, steady, steady_floors = [], [], [], []
    calls: Counter[str] = Counter()
    repairs = 0
    for _ in range(repeats):
        _restore_drift(dead_ids)
        for _ in range(orphans):
            start_instance(uuid.uuid4())
        floors.append(timed(lambda: _floor(backend)))
        counting.calls.clear()
        started = time.perf_counter()
        report = reconcile_once({backend_name: counting})
        samples.append(time.perf_counter() - started)
        calls = Counter(counting.calls)
        repairs = len(report.repairs)
        # Nothing left to repair: the cost of agreeing.
        steady_floors.append(timed(lambda: _floor(backend)))
        steady.append(timed(lambda: reconcile_once({backend_name: counting})))

    for workspace_id in real_ids:
        backend.stop(workspace_id, {}, 1)
    _clear(owner)

    total = sum(calls.values())
    detail = ", ".join(f"{count} {name}" for name, count in sorted(calls.items()))
    extra = {"rows": rows, "backend_calls": dict(calls), "repairs": repairs}
    return [
        Figure(
            name=(
                f"reconcile pass, {rows} workspaces on {backend_name} "
                f"({dead} dead + {orphans} orphans repaired; {total} backend calls: {detail})"
            ),
            unit="s",
            samples=samples,
            floor_name="list_instances + one SELECT",
            floor_samples=floors,
            extra=extra,
        ),
        Figure(
            name=f"reconcile pass, {rows} workspaces on {backend_name}, nothing to repair",
            unit="s",
            samples=steady,
            floor_name="list_instances + one SELECT",
            floor_samples=steady_floors,
            extra={"rows": rows},
        ),
    ]


def run(repeats: int = 3) -> list[Figure]:
    data_dir = tempfile.mkdtemp(prefix="bench-reconcile-")
    os.environ["WORKSPACE_DATA_DIR"] = data_dir
    os.environ.setdefault("LOG_LEVEL", "ERROR")
    setup_django("workspaces_bench_reconcile", 6)

    from django.conf import settings

    from provisioning.backends import backend_named
    from provisioning.backends.base import LaunchSpec
    from provisioning.manifests import templates

    settings.WORKSPACE_DATA_DIR = data_dir
    backend = backend_named("process")
    template = templates().get("shell-default")
    assert template is not None

    def start_instance(workspace_id: uuid.UUID) -> None:
        env = {
            "WORKSPACE_ID": str(workspace_id),
            "WORKSPACE_TOKEN": "bench",
            "PLATFORM_URL": "http://127.0.0.1:9",
            "AGENT_BOOT_DELAY_SECONDS": "3600",  # sleeps; never calls the platform
        }
        backend.start(LaunchSpec(workspace_id, 1, template, env), {})

    try:
        return measure(backend, "process", start_instance, repeats=repeats)
    finally:
        for info in backend.list_instances():
            backend.stop(uuid.UUID(info.workspace_id), {}, 1)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    for figure in run(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        print(figure.line())
        if figure.extra.get("backend_calls"):
            print(f"  backend calls: {figure.extra['backend_calls']}")
