"""One reconciliation pass over many workspaces, with its count of backend calls.

Scenario (per backend): ``rows`` workspaces in the database, most of them stopped with no
instance; ``real`` online with a real running instance; ``dead`` online whose instance is gone
(drift, repaired by the pass); ``orphans`` instances labelled for unknown workspaces (removed by
the pass). Each repeat restores the drift, then times one pass.

Floor, measured in the same run: the pass's unavoidable reads, one ``list_instances()`` and one
SELECT of the rows. A second figure times a pass with no drift at all against the same floor.

``run`` measures two backends:

* the process backend, 10 000 workspaces (5 with a real agent process sleeping in its boot
  delay);
* the Docker backend on a real engine (``bench.engine.ensure_engine``: DOCKER_HOST if it answers,
  else a private dockerd), 505 workspaces of which 500 have a **running** container from the agent
  image (entrypoint ``sleep``, busybox, not the agent: nothing registers) with the platform's
  labels and a labelled config volume, as the Docker backend makes them. Its floor is the bare
  SDK list call (``client.api.containers(all=True, filters=<platform label>)``, one request) plus
  one SELECT; the figure also counts the HTTP requests the pass sent to the engine. The bench uses
  its own ``PLATFORM_ID`` (a pass removes every orphan it sees) and removes its containers and
  volumes at the end.

    .venv/bin/python -m bench.reconcile [repeats]
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from bench.common import Figure, print_figures, setup_django, timed
from bench.stack import workspace_labels

ROWS = 10_000
REAL = 5
DEAD = 5
ORPHANS = 3
DOCKER_CONTAINERS = 500


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


class RequestCounter:
    """Counts the HTTP requests a Docker SDK client sends (a response hook on its session)."""

    def __init__(self, api: Any) -> None:
        self.counts: Counter[str] = Counter()
        api.hooks["response"].append(self._hook)

    def _hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        path = urlsplit(response.url).path
        # /v1.41/containers/<id>?... -> "DELETE /containers/{id}"
        parts = path.split("/")[2:]
        if len(parts) > 1 and parts[1] not in ("json", "create", "prune"):
            parts[1] = "{id}"
        self.counts[f"{response.request.method} /{'/'.join(parts)}"] += 1


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


def _select() -> None:
    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

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
    floor: Callable[[], None] | None = None,
    floor_name: str = "list_instances + one SELECT",
    engine_requests: RequestCounter | None = None,
    parallel: int = 1,
) -> list[Figure]:
    """Time one pass over ``rows`` workspaces on ``backend`` (registered as ``backend_name``),
    side by side with the floor (default: ``backend.list_instances()`` and one SELECT);
    ``start_instance`` starts one labelled instance (``parallel`` at a time while setting up).
    The caller stops the instances afterwards."""
    from provisioning.reconciler import reconcile_once

    def floor_reads() -> None:
        if floor is None:
            backend.list_instances()
        else:
            floor()
        _select()

    owner = _owner()
    _clear(owner)
    running = _insert(owner, backend_name, rows, real + dead)
    real_ids, dead_ids = running[:real], running[real:]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(start_instance, real_ids))

    counting = CountingBackend(backend)
    samples, floors, steady, steady_floors = [], [], [], []
    calls: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    steady_requests: Counter[str] = Counter()
    repairs = 0
    for _ in range(repeats):
        _restore_drift(dead_ids)
        for _ in range(orphans):
            start_instance(uuid.uuid4())
        floors.append(timed(floor_reads))
        counting.calls.clear()
        if engine_requests:
            engine_requests.counts.clear()
        started = time.perf_counter()
        report = reconcile_once({backend_name: counting})
        samples.append(time.perf_counter() - started)
        calls = Counter(counting.calls)
        requests = Counter(engine_requests.counts if engine_requests else {})
        repairs = len(report.repairs)
        # Nothing left to repair: the cost of agreeing. The engine may still be tearing down the
        # orphans just removed, so one untimed pass first, then floor and pass alternate.
        reconcile_once({backend_name: counting})
        for _ in range(3):
            steady_floors.append(timed(floor_reads))
            if engine_requests:
                engine_requests.counts.clear()
            steady.append(timed(lambda: reconcile_once({backend_name: counting})))
            steady_requests = Counter(engine_requests.counts if engine_requests else {})
    _clear(owner)

    total = sum(calls.values())
    detail = ", ".join(f"{count} {name}" for name, count in sorted(calls.items()))
    extra: dict[str, Any] = {"rows": rows, "backend_calls": dict(calls), "repairs": repairs}
    steady_extra: dict[str, Any] = {"rows": rows}
    engine = steady_engine = ""
    if engine_requests:
        extra["engine_requests"] = dict(requests)
        steady_extra["engine_requests"] = dict(steady_requests)
        engine = f"; {sum(requests.values())} engine requests"
        steady_engine = f" ({sum(steady_requests.values())} engine requests)"
    return [
        Figure(
            name=(
                f"reconcile pass, {rows} workspaces on {backend_name} "
                f"({dead} dead + {orphans} orphans repaired; {total} backend calls: {detail}"
                f"{engine})"
            ),
            unit="s",
            samples=samples,
            floor_name=floor_name,
            floor_samples=floors,
            extra=extra,
        ),
        Figure(
            name=(
                f"reconcile pass, {rows} workspaces on {backend_name}, nothing to repair"
                f"{steady_engine}"
            ),
            unit="s",
            samples=steady,
            floor_name=floor_name,
            floor_samples=steady_floors,
            extra=steady_extra,
        ),
    ]


def _process_figures(repeats: int, data_dir: str) -> list[Figure]:
    from django.conf import settings

    from provisioning.backends import backend_named
    from provisioning.backends.base import LaunchSpec
    from workspaces.manifests import templates

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


def docker_figures(repeats: int, containers: int = DOCKER_CONTAINERS) -> list[Figure]:
    import docker.errors
    from django.conf import settings

    from provisioning.backends import backend_named, reset_backends
    from provisioning.backends.agent_image import build_agent_image
    from provisioning.backends.docker import DockerBackend
    from provisioning.backends.engine import make_client, platform_filter

    reset_backends()  # DOCKER_HOST and PLATFORM_ID were set for this run
    client = make_client()
    try:
        client.images.get(settings.DOCKER_AGENT_IMAGE)
    except docker.errors.ImageNotFound:
        build_agent_image()  # a fresh private engine: built locally, no registry is used
    backend = backend_named("docker")
    assert isinstance(backend, DockerBackend)
    labelled = {"label": platform_filter()}

    def start_instance(workspace_id: uuid.UUID) -> None:
        # What the Docker backend makes (name, labels, a labelled config volume), running
        # busybox's sleep instead of the agent so nothing calls a platform.
        volume = client.volumes.create(
            name=DockerBackend.volume_name(workspace_id), labels=workspace_labels(workspace_id)
        )
        client.containers.run(
            settings.DOCKER_AGENT_IMAGE,
            entrypoint=["sleep", "3600"],
            name=DockerBackend.container_name(workspace_id),
            labels=workspace_labels(workspace_id, generation=1),
            volumes={volume.name: {"bind": settings.DOCKER_CONFIG_MOUNT, "mode": "rw"}},
            network_mode="none",  # listing does not depend on it; nothing to wire
            detach=True,
        )

    def bare_list() -> None:
        client.api.containers(all=True, filters=labelled)

    def cleanup() -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            rows = client.api.containers(all=True, filters=labelled)
            list(pool.map(lambda row: client.api.remove_container(row["Id"], force=True), rows))
            volumes = client.api.volumes(filters=labelled).get("Volumes") or []
            list(pool.map(lambda v: client.api.remove_volume(v["Name"], force=True), volumes))

    cleanup()  # leftovers of an interrupted earlier run of this bench
    try:
        return measure(
            backend,
            "docker",
            start_instance,
            repeats=repeats,
            rows=containers + DEAD,
            real=containers,
            floor=bare_list,
            floor_name="bare SDK containers list (1 request) + one SELECT",
            engine_requests=RequestCounter(backend.client.api),
            parallel=8,
        )
    finally:
        cleanup()
        client.close()


def run(repeats: int = 3) -> list[Figure]:
    from bench.engine import ensure_engine

    # Before Django reads its settings: the engine to use, and a platform id of the bench's own,
    # because a pass removes every container labelled with its platform that has no row.
    os.environ["DOCKER_HOST"] = ensure_engine()
    platform_id = os.environ.get("PLATFORM_ID")
    os.environ["PLATFORM_ID"] = f"bench-reconcile-{os.getpid()}"
    data_dir = tempfile.mkdtemp(prefix="bench-reconcile-")
    os.environ["WORKSPACE_DATA_DIR"] = data_dir
    os.environ.setdefault("LOG_LEVEL", "ERROR")
    setup_django("workspaces_bench_reconcile", 6)
    from django.conf import settings

    # Settings may have been loaded already (python -m bench runs every module in one process).
    previous = (settings.PLATFORM_ID, settings.WORKSPACE_BACKEND)
    settings.DOCKER_HOST = os.environ["DOCKER_HOST"]
    settings.PLATFORM_ID = os.environ["PLATFORM_ID"]
    settings.WORKSPACE_BACKEND = "process"
    try:
        return _process_figures(repeats, data_dir) + docker_figures(repeats)
    finally:
        # Later benchmarks in the same process see the platform they were configured with.
        settings.PLATFORM_ID, settings.WORKSPACE_BACKEND = previous
        if platform_id is None:
            os.environ.pop("PLATFORM_ID", None)
        else:
            os.environ["PLATFORM_ID"] = platform_id


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
