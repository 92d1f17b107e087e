"""Docker backend overhead, each figure beside its floor on the same engine in the same run.

For each network mode (``veth``, the default: networking disabled and a veth link the worker
makes; ``workspace``: an internal bridge network per workspace, made through the engine; ``host``,
the documented opt-out) with the default config delivery (``image``: the engine fills the volume
from the template's config image as it creates the container), and for ``host`` with
``DOCKER_CONFIG_DELIVERY=archive`` (one put_archive per provision):

* a provision cycle (``lifecycle.converge``: gate, fenced DB writes, token, network or link,
  container with its volume, the config, start) vs the bare engine calls the same start needs
  (network create and inspect in ``workspace`` mode, create with the volume mount (``veth``:
  networking disabled), with ``archive`` one put_archive of the config files and marker, start,
  one inspect), called one after the other;
* the engine's CPU per provisioned workspace (dockerd, containerd and the shims, read from /proc
  around a batch of cycles) vs what a bare container costs it: create, start and inspect on the
  host's network with no volume and no archive (what DockerSpawner asks of the engine).

And ``list_instances()`` vs the bare list calls it makes (containers, volumes).

Uses the engine in DOCKER_HOST, or a private dockerd (``bench.engine.ensure_engine``; CPU figures
need ``BENCH_DOCKERD_ROOT`` to find the engine's processes, which ensure_engine sets for its own),
and builds the agent image there when it is missing. Run: ``.venv/bin/python -m bench --only
docker_backend``.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Callable

from bench.common import Figure, print_figures, setup_django, timed

BATCH = 5  # workspaces per CPU sample: the kernel counts CPU in 10 ms ticks


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _engine_ms_per(count: int, work: Callable[[], None]) -> float:
    from bench.engine import cpu_seconds

    before = cpu_seconds([])["engine"]
    work()
    return (cpu_seconds([])["engine"] - before) * 1000 / count


def _times(count: int, work: Callable[[], None]) -> None:
    for _ in range(count):
        work()


def run(repeats: int) -> list[Figure]:
    from bench.engine import ensure_agent_image, ensure_engine

    ensure_engine()
    setup_django(database=os.environ.get("BENCH_DATABASE", "ws_docker_bench"), redis_db=5)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from docker.types import Mount

    from provisioning import lifecycle
    from provisioning.backends import backend_for
    from provisioning.backends.engine import make_client, platform_filter
    from workspaces import services
    from workspaces.models import Workspace

    ensure_agent_image()
    # Agents must not register during the bench: nothing listens on this port.
    settings.PLATFORM_URL = "http://127.0.0.1:9"
    client = make_client()
    user, _ = get_user_model().objects.get_or_create(username="bench-docker")
    image = settings.DOCKER_AGENT_IMAGE
    mount = settings.DOCKER_CONFIG_MOUNT
    made: list[Workspace] = []
    raw: list[str] = []

    def provision() -> None:
        workspace = services.create_workspace(
            owner=user,
            name=f"b-{uuid.uuid4().hex[:12]}",
            template="shell-default",
            backend="docker",
        )
        made.append(workspace)
        lifecycle.converge(workspace.id)

    def bare(mode: str, volume: bool = True, archive: bool = False) -> None:
        name = f"bench-raw-{uuid.uuid4().hex[:12]}"
        raw.append(name)
        network_mode = "none" if mode == "veth" else "host"
        if mode == "workspace":
            created = client.api.create_network(
                f"{name}-net", driver="bridge", internal=True, check_duplicate=True
            )
            client.api.inspect_network(created["Id"])
            network_mode = f"{name}-net"
        mounts = [Mount(target=mount, source=f"{name}-configs", type="volume")] if volume else []
        container = client.api.create_container(
            image,
            name=name,
            environment={"WORKSPACE_ID": name, "WORKSPACE_TOKEN": "x", "PLATFORM_URL": "x"},
            host_config=client.api.create_host_config(mounts=mounts, network_mode=network_mode),
            network_disabled=mode == "veth",
        )
        if archive:
            client.api.put_archive(
                container["Id"], mount, _tar({"profile.sh": b"# profile\n", ".provisioned": b"{}"})
            )
        client.api.start(container["Id"])
        client.api.inspect_container(container["Id"])

    def clean() -> None:
        for workspace in made:
            backend_for(workspace).remove(workspace.id, {})
        Workspace.objects.filter(id__in=[w.id for w in made]).delete()
        made.clear()
        for name in raw:
            client.api.remove_container(name, force=True)
            for leftover in client.api.volumes(filters={"name": name}).get("Volumes") or []:
                client.api.remove_volume(leftover["Name"], force=True)
            for network in client.api.networks(names=[f"{name}-net"]):
                client.api.remove_network(network["Id"])
        raw.clear()

    figures: list[Figure] = []
    spawner_cpu: list[float] = []
    variants = (("veth", "image"), ("workspace", "image"), ("host", "image"), ("host", "archive"))
    for mode, delivery in variants:
        settings.DOCKER_NETWORK_MODE = mode
        settings.DOCKER_CONFIG_DELIVERY = delivery
        archive = delivery == "archive"
        cycle: list[float] = []
        floor: list[float] = []
        cycle_cpu: list[float] = []
        provision()  # builds the template's config image on this engine, untimed
        clean()
        for _ in range(repeats):
            cycle.append(timed(provision))
            floor.append(timed(lambda mode=mode, archive=archive: bare(mode, True, archive)))
            cycle_cpu.append(_engine_ms_per(BATCH, lambda: _times(BATCH, provision)))
            spawner_cpu.append(
                _engine_ms_per(BATCH, lambda: _times(BATCH, lambda: bare("host", False)))
            )
            clean()
        network = "network create+inspect, " if mode == "workspace" else ""
        disabled = " (networking disabled)" if mode == "veth" else ""
        copy = ", put_archive" if archive else ""
        variant = f"DOCKER_NETWORK_MODE={mode}, DOCKER_CONFIG_DELIVERY={delivery}"
        figures.append(
            Figure(
                f"docker provision cycle, {variant} (converge to start)",
                "s",
                cycle,
                floor_name=f"bare engine {network}create with volume{disabled}{copy}, start, "
                "inspect",
                floor_samples=floor,
            )
        )
        figures.append(
            Figure(
                f"engine CPU per provision, {variant}",
                "ms",
                cycle_cpu,
                floor_name="engine CPU per bare container (host network, no volume: create, "
                "start, inspect)",
                floor_samples=spawner_cpu[-repeats:],
            )
        )

    settings.DOCKER_NETWORK_MODE = "host"
    settings.DOCKER_CONFIG_DELIVERY = "image"
    for _ in range(repeats):
        provision()
    backend = backend_for(made[0])
    listing = [timed(backend.list_instances) for _ in range(repeats * 3)]
    labelled = {"label": platform_filter()}

    def bare_list() -> None:
        client.api.containers(all=True, filters=labelled)
        client.api.volumes(filters=labelled)

    bare_listing = [timed(bare_list) for _ in range(repeats * 3)]
    clean()
    client.close()
    figures.append(
        Figure(
            f"list_instances ({repeats} containers)",
            "s",
            listing,
            floor_name="bare containers + volumes list calls",
            floor_samples=bare_listing,
        )
    )
    return figures


if __name__ == "__main__":
    print_figures(run(int(os.environ.get("BENCH_REPEATS", "10"))))
