"""Swarm backend beside the Docker backend on the same engine (a one-node swarm), in one run.

**Provisioning.** Two platforms run for the whole bench, as users run them (``bench.stack``:
gunicorn, 2 workers x 4 threads, and one Celery worker, prefork, concurrency 4), one with
``WORKSPACE_BACKEND=swarm`` and one with ``WORKSPACE_BACKEND=docker``, each with its own Celery
queue and ``PLATFORM_ID``, against the same engine (the swarm's manager). N = 1, 10 and 50
threads send ``POST /api/workspaces/`` together (shell-default: the busybox agent image); per
workspace, latency is the POST being sent to its ``WORKSPACE_ONLINE`` event (the agent's
registration over HTTP), and the run's figure is the first POST to the last ``online``
(``bench.provisioning.platform_run``). Both use host networking (the Swarm backend's only mode;
``DOCKER_NETWORK_MODE=host`` for Docker), so neither makes a network. The figure is the Swarm
platform; its floor is the Docker platform in the same run: the two alternate (which goes first
flips every repeat), and every workspace is removed between runs (untimed; Swarm through the
backend's own ``remove``). A Swarm workspace is a secret, one config per template file plus a
marker, and a service whose task the swarm schedules; the cycle polls the task list until its task
runs.

The notes split each workspace's latency into ``bench.provisioning``'s phases; on Swarm,
"container running" is the row's ``last_started_at``, written once the cycle saw its task
running.

**Reconcile.** One ``reconcile_once`` pass (``bench.reconcile.measure``) over 505 Swarm
workspaces, 500 of them online with a **running** service made as the backend makes them (name,
labels on the service and on its task's container, host network, restart condition ``none``),
running busybox's ``sleep`` instead of the agent, so nothing registers; 5 online rows whose service
is gone (drift, repaired) and 3 services of unknown workspaces (orphans, removed). Floor: the
pass's unavoidable reads, the bare ``tasks`` call (one request) plus one SELECT. Then
``list_instances()`` alone over the 500 services against the same bare ``tasks`` call. Then the
same pass on the Docker backend over 500 running containers on the same engine
(``bench.reconcile``'s Docker scenario), and a figure that sets the two passes with nothing to
repair side by side (Swarm, floor Docker).

Engine: ``SWARM_MANAGER_HOST`` or ``DOCKER_HOST`` when it answers and is a swarm manager, else a
private dockerd made a one-node swarm (``tests.swarm_support``), stopped at the end. The agent
image is built there when it is missing.

    .venv/bin/python -m bench.swarm_backend [repeats]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Figure, print_figures, setup_django, timed
from bench.stack import label_key, workspace_labels

SIZES = (1, 10, 50)
SERVICES = 500
DEAD = 5


def _is_manager(host: str) -> bool:
    import docker
    from docker.errors import DockerException

    try:
        client = docker.DockerClient(base_url=host, timeout=10)
        try:
            swarm = client.info().get("Swarm") or {}
        finally:
            client.close()
    except DockerException:
        return False
    return swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))


@contextlib.contextmanager
def swarm_manager() -> Iterator[str]:
    """A swarm manager's engine: the one configured, or a private one-node swarm."""
    host = os.environ.get("SWARM_MANAGER_HOST") or os.environ.get("DOCKER_HOST") or ""
    if host and _is_manager(host):
        yield host
        return
    from tests.swarm_support import Engine, free_loopback

    engine = Engine(free_loopback(set())).start()
    try:
        engine.init_swarm()
        yield engine.host
    finally:
        engine.stop()


def run(repeats: int = 3) -> list[Figure]:
    with swarm_manager() as host:
        # Before Django reads its settings: both backends on this engine, host networking, and a
        # platform id of the bench's own (a reconcile pass removes every orphan of its platform).
        os.environ["DOCKER_HOST"] = host
        os.environ["SWARM_MANAGER_HOST"] = host
        os.environ["DOCKER_NETWORK_MODE"] = "host"
        os.environ["PLATFORM_ID"] = f"bench-swarm-{os.getpid()}"
        os.environ["WORKSPACE_BACKEND"] = "swarm"
        os.environ.setdefault("LOG_LEVEL", "WARNING")
        setup_django("ws_swarm_bench", redis_db=5)
        from bench.engine import ensure_agent_image

        ensure_agent_image()
        figures = _provisioning(repeats)
        figures += _reconcile(repeats)
        return figures


# -- provisioning ----------------------------------------------------------------------------


def _clean(stack: Any, backend_name: str) -> None:
    """Remove every workspace the platform made (untimed), then their rows."""
    from django.conf import settings

    from bench.stack import remove_labelled
    from provisioning.backends import backend_named
    from workspaces.models import Workspace

    rows = Workspace.objects.filter(owner__username=stack.owner)
    if backend_name == "docker":
        remove_labelled(stack.label)
    else:
        backend = backend_named("swarm")
        own = settings.PLATFORM_ID
        settings.PLATFORM_ID = stack.platform_id  # the labels the platform under test wrote
        try:
            ids = list(rows.values_list("id", flat=True))
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda workspace_id: backend.remove(workspace_id, {}), ids))
        finally:
            settings.PLATFORM_ID = own
    rows.delete()


def _provisioning(repeats: int) -> list[Figure]:
    from bench.provisioning import Run, phase_notes, platform_run
    from bench.stack import platform

    log_dir = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    runs: dict[tuple[str, int], list[Run]] = {}
    sides = ("swarm", "docker")
    with contextlib.ExitStack() as stacks:
        started = {
            name: stacks.enter_context(
                platform(
                    f"{name}-side",
                    log_dir / name,
                    backend=name,
                    extra_env={"CELERY_LIFECYCLE_QUEUE": f"bench-{name}-{os.getpid()}"},
                )
            )
            for name in sides
        }
        for name in sides:
            _clean(started[name], name)
            # One untimed workspace first: imports, connections and the image's page cache warm.
            platform_run(started[name], 1)
            _clean(started[name], name)
        for repeat in range(repeats):
            for n in SIZES:
                order = sides if repeat % 2 == 0 else tuple(reversed(sides))
                for name in order:
                    try:
                        result = platform_run(started[name], n)
                    finally:
                        _clean(started[name], name)
                    runs.setdefault((name, n), []).append(result)
                    print(
                        f"# repeat {repeat + 1} N={n} {name}: total {result.total:.2f} s, "
                        f"p50 {result.p50:.2f} s, p95 {result.p95:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )

    figures = []
    for n in SIZES:
        on_swarm, on_docker = runs[("swarm", n)], runs[("docker", n)]
        for metric, label in (
            ("total", "first POST to last online"),
            ("p50", "per-workspace p50"),
            ("p95", "per-workspace p95"),
        ):
            notes = ""
            if metric == "total":
                notes = "; ".join(
                    f"{side} {phase_notes(side_runs, 'platform')}"
                    for side, side_runs in (("Swarm", on_swarm), ("Docker", on_docker))
                )
            figure = Figure(
                name=f"Swarm: provision N={n}, {label}",
                unit="s",
                samples=[getattr(r, metric) for r in on_swarm],
                floor_name=f"Docker: the same, {label}",
                floor_samples=[getattr(r, metric) for r in on_docker],
                notes=notes,
                extra={"n": n, "metric": metric},
            )
            if n == max(SIZES) and metric == "total":
                figure.extra["headline"] = (
                    f"Swarm backend against Docker on the same engine, N = {n} at once, first "
                    f"POST to last online: **{figure.ratio:.2f}x** "
                    f"({figure.stats['median']:.2f} s against "
                    f"{(figure.floor_stats or {}).get('median', 0):.2f} s)"
                )
            figures.append(figure)
    return figures


# -- reconcile -------------------------------------------------------------------------------


def _service_maker(client: Any) -> Callable[[uuid.UUID], None]:
    from django.conf import settings
    from docker.types import ContainerSpec, RestartPolicy, ServiceMode, TaskTemplate

    from provisioning.backends.swarm import SwarmBackend

    def start_instance(workspace_id: uuid.UUID) -> None:
        labels = workspace_labels(workspace_id, generation=1)
        name = SwarmBackend.container_name(workspace_id)
        client.api.create_service(
            TaskTemplate(
                # Ends at once on SIGTERM, so removing 500 services does not wait out a grace.
                ContainerSpec(
                    settings.DOCKER_AGENT_IMAGE,
                    ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                    labels=labels,
                ),
                restart_policy=RestartPolicy(condition="none"),
                networks=["host"],
            ),
            name=name,
            labels=labels,
            mode=ServiceMode("replicated", replicas=1),
        )
        # Online rows expect a running instance: wait for the task, as a cycle does.
        deadline = time.monotonic() + 300
        while True:
            tasks = client.api.tasks(filters={"service": name})
            if any((t.get("Status") or {}).get("State") == "running" for t in tasks):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the task of {name} is not running after 300 s")
            time.sleep(0.3)

    return start_instance


def _remove_services(backend: Any) -> None:
    """Every service of the bench's platform, in the backend's order: stopped (scaled to 0, its
    tasks reaped, see ``SwarmBackend.stop``), then removed."""
    from provisioning.backends.engine import platform_filter

    client = backend.client
    services = client.api.services(filters={"label": platform_filter()})
    key = label_key("workspace-id")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(lambda s: backend.stop(uuid.UUID(s["Spec"]["Labels"][key]), {}, 0.0), services)
        )
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: client.api.remove_service(s["ID"]), services))


def _reconcile(repeats: int) -> list[Figure]:
    from bench.reconcile import RequestCounter, docker_figures, measure
    from provisioning.backends import backend_named, reset_backends
    from provisioning.backends.engine import platform_filter
    from provisioning.backends.swarm import SwarmBackend

    reset_backends()
    backend = backend_named("swarm")
    assert isinstance(backend, SwarmBackend)
    client = backend.client
    labelled = {"label": platform_filter()}

    def bare_tasks() -> None:
        client.api.tasks(filters=labelled)

    _remove_services(backend)  # leftovers of an interrupted earlier run of this bench
    started = time.perf_counter()
    try:
        figures = measure(
            backend,
            "swarm",
            _service_maker(client),
            repeats=repeats,
            rows=SERVICES + DEAD,
            real=SERVICES,
            dead=DEAD,
            floor=bare_tasks,
            floor_name="bare tasks call (1 request) + one SELECT",
            engine_requests=RequestCounter(client.api),
            parallel=8,
        )
        print(
            f"# {SERVICES} services made and measured in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        listed = len(backend.list_instances())
        listing, bare = [], []
        for _ in range(repeats * 3):  # alternating, so both pay for the machine's load alike
            listing.append(timed(backend.list_instances))
            bare.append(timed(bare_tasks))
        for figure in figures:
            requests = figure.extra.get("engine_requests") or {}
            figure.notes = "engine requests of the last pass: " + ", ".join(
                f"{count} {name}" for name, count in sorted(requests.items())
            )
        figures.append(
            Figure(
                f"Swarm list_instances() over {listed} running services",
                "s",
                listing,
                floor_name="the bare tasks call it makes",
                floor_samples=bare,
            )
        )
    finally:
        _remove_services(backend)
    docker_side = docker_figures(repeats, SERVICES)
    steady_swarm, steady_docker = figures[1], docker_side[1]
    figures += docker_side
    figures.append(
        Figure(
            f"Swarm: reconcile pass over {SERVICES + DEAD} workspaces ({SERVICES} running), "
            "nothing to repair",
            "s",
            steady_swarm.samples,
            floor_name="Docker: the same pass over containers, same engine",
            floor_samples=steady_docker.samples,
        )
    )
    return figures


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
