"""Docker backend overhead, each figure beside its floor on the same engine in the same run.

* a provision cycle (``lifecycle.converge``: gate, fenced DB writes, token, prepare, config copy,
  start) vs the bare engine calls any such start needs (volume, create, one put_archive of the
  config files and marker, start, one inspect), called one after the other;
* ``list_instances()`` vs the bare list calls it makes (containers, volumes), with the cycle's
  containers present.

Uses the engine in DOCKER_HOST, or a private dockerd (``bench.engine.ensure_engine``), and builds
the agent image there when it is missing. Run: ``.venv/bin/python -m bench.docker_backend``.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid

from bench.common import Figure, setup_django, timed


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def run(repeats: int) -> list[Figure]:
    from bench.engine import ensure_agent_image, ensure_engine

    ensure_engine()
    setup_django(database=os.environ.get("BENCH_DATABASE", "ws_docker_bench"), redis_db=5)
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from provisioning import lifecycle
    from provisioning.backends import backend_for
    from provisioning.backends.docker import make_client, platform_filter
    from workspaces import services
    from workspaces.models import Workspace

    ensure_agent_image()
    # Agents must not register during the bench: nothing listens on this port.
    settings.PLATFORM_URL = "http://127.0.0.1:9"
    client = make_client()
    user, _ = get_user_model().objects.get_or_create(username="bench-docker")
    image = settings.DOCKER_AGENT_IMAGE
    mount = settings.DOCKER_CONFIG_MOUNT

    cycle: list[float] = []
    floor: list[float] = []
    made: list[Workspace] = []
    raw: list[str] = []
    for _ in range(repeats):
        workspace = services.create_workspace(
            owner=user,
            name=f"b-{uuid.uuid4().hex[:12]}",
            template="shell-default",
            backend="docker",
        )
        made.append(workspace)
        cycle.append(timed(lambda ws=workspace: lifecycle.converge(ws.id)))

        name = f"bench-raw-{uuid.uuid4().hex[:12]}"
        raw.append(name)

        def bare(name: str = name) -> None:
            client.volumes.create(name=f"{name}-configs")
            container = client.containers.create(
                image,
                name=name,
                environment={"WORKSPACE_ID": name, "WORKSPACE_TOKEN": "x", "PLATFORM_URL": "x"},
                volumes={f"{name}-configs": {"bind": mount, "mode": "rw"}},
                network_mode=settings.DOCKER_NETWORK_MODE,
            )
            container.put_archive(
                mount, _tar({"profile.sh": b"# profile\n", ".provisioned": b"{}"})
            )
            container.start()
            container.reload()

        floor.append(timed(bare))

    backend = backend_for(made[0])
    listing = [timed(backend.list_instances) for _ in range(repeats * 3)]
    labelled = {"label": platform_filter()}

    def bare_list() -> None:
        client.api.containers(all=True, filters=labelled)
        client.api.volumes(filters=labelled)

    bare_listing = [timed(bare_list) for _ in range(repeats * 3)]

    for workspace in made:
        backend.remove(workspace.id, {})
    Workspace.objects.filter(id__in=[w.id for w in made]).delete()
    for name in raw:
        client.containers.get(name).remove(force=True)
        client.volumes.get(f"{name}-configs").remove(force=True)
    client.close()
    return [
        Figure(
            "docker provision cycle (converge to start)",
            "s",
            cycle,
            floor_name="bare engine volume+create+put_archive+start+inspect",
            floor_samples=floor,
        ),
        Figure(
            f"list_instances ({repeats} containers)",
            "s",
            listing,
            floor_name="bare containers + volumes list calls",
            floor_samples=bare_listing,
        ),
    ]


if __name__ == "__main__":
    for figure in run(int(os.environ.get("BENCH_REPEATS", "10"))):
        print(figure.line())
