"""How the Docker backend makes a workspace's container, and what fills its config volume.

One engine create per container: the config volume comes with it (labelled like the
container; a new volume takes the owner and mode of the image's folder), on the network
``docker_networks`` attaches it to, as ``DOCKER_WORKSPACE_USER`` with ``no-new-privileges``, every
capability dropped and the manifest's ``resources`` (or the ``DOCKER_DEFAULT_*`` limits), under
the runtime of the workspace's sandbox (``runtime_for``: the engine's default for runc, the
runtime named ``DOCKER_GVISOR_RUNTIME`` for gvisor, checked by ``check_runtime`` first).

The config volume is filled in one of two ways (``DOCKER_CONFIG_DELIVERY``): ``image``, where the
container is created from the template's config image (``agent_image``: FROM the agent image,
the template's files at the config mount) and the engine copies those files into the volume
whenever it is empty; or ``archive``, one ``put_archive`` of ``config_archive`` with the marker
last.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time
from collections.abc import Mapping
from typing import Any

import docker
import docker.errors
from django.conf import settings
from docker.types import Mount

from provisioning.backends import docker_networks
from provisioning.backends.agent_image import (
    build_config_image,
    config_image_files,
    config_image_tag,
)
from provisioning.backends.base import LaunchSpec, SandboxUnavailable
from provisioning.backends.engine import (
    config_mount,
    engine_errors,
    environment,
    image_for,
    label,
    labels,
    limits,
    safe_relative,
    volume_name,
    workspace_user_ids,
)

# How long a base image's id is trusted before it is read again (a rebuilt agent image reaches
# new config images within this time).
_BASE_ID_SECONDS = 60.0
# How long an engine's answer that it has a runtime is trusted (GET /info costs the engine more
# than a ping). An absent runtime is asked again on every start, so a runtime an operator adds
# serves the next start; one removed within this time fails that container's create instead.
_RUNTIMES_SECONDS = 60.0


def runtime_for(sandbox: str) -> str | None:
    """The engine's runtime for ``sandbox``: None (the engine's default, runc) or gVisor's."""
    return settings.DOCKER_GVISOR_RUNTIME if sandbox == "gvisor" else None


class NameTaken(Exception):
    """The engine refused a create: a container of that name exists."""


class _ImageMissing(Exception):
    """The engine refused a create: it does not have the config image."""


def config_in_image(spec: LaunchSpec) -> bool:
    """Whether the container is created from the template's config image (the contract's
    ``config_in_image``). The agent reports the engine's copy; a template's own command runs
    no agent."""
    return settings.DOCKER_CONFIG_DELIVERY == "image" and not spec.template.command


def config_archive(files: Mapping[str, bytes], mtime: float) -> bytes:
    """``files`` as a tar for ``put_archive``, owned by the workspace user, in the order given
    (the engine extracts entries in order: the caller puts the marker last)."""
    owner = workspace_user_ids()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        directories: set[str] = set()
        for relative, content in files.items():
            name = safe_relative(relative)
            parent = posixpath.dirname(name)
            # Parents first, so put_archive creates nested folders with sane modes.
            while parent and parent not in directories:
                directories.add(parent)
                info = tarfile.TarInfo(parent)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
                info.uid, info.gid = owner
                archive.addfile(info)
                parent = posixpath.dirname(parent)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, int(mtime)
            info.uid, info.gid = owner
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class ContainerMaker:
    """Creates workspace containers, remembering base image ids for a while (config image tags
    name them)."""

    def __init__(self) -> None:
        # The base image's id by reference, with when it was read.
        self._base_ids: dict[str, tuple[str, float]] = {}
        # Runtimes the engine said it has, with when it said so.
        self._runtimes: dict[str, float] = {}

    def check_runtime(self, client: docker.DockerClient, sandbox: str) -> None:
        """Raise ``SandboxUnavailable`` naming the runtime when the engine lacks the one
        ``sandbox`` runs under (an engine always has its default)."""
        runtime = runtime_for(sandbox)
        if runtime is None:
            return
        seen = self._runtimes.get(runtime)
        if seen is not None and time.monotonic() - seen < _RUNTIMES_SECONDS:
            return
        with engine_errors("reading the engine's runtimes"):
            runtimes = client.info().get("Runtimes") or {}
        if runtime not in runtimes:
            raise SandboxUnavailable(
                "docker",
                sandbox,
                f"the engine has no runtime {runtime!r} (DOCKER_GVISOR_RUNTIME; it has "
                f"{', '.join(sorted(runtimes)) or 'none'}): register gVisor's runsc in the "
                'engine\'s daemon.json "runtimes"',
                container_runtime=runtime,
            )
        self._runtimes[runtime] = time.monotonic()

    def _base_id(self, client: docker.DockerClient, base: str, *, fresh: bool = False) -> str:
        known = self._base_ids.get(base)
        if not fresh and known is not None and time.monotonic() - known[1] < _BASE_ID_SECONDS:
            return known[0]
        with engine_errors(f"inspecting image {base}"):
            image_id = str(client.api.inspect_image(base)["Id"])
        self._base_ids[base] = (image_id, time.monotonic())
        return image_id

    def _config_image(
        self, client: docker.DockerClient, spec: LaunchSpec
    ) -> tuple[str, dict[str, bytes]]:
        """The tag of the template's config image (FROM the base image) and its files."""
        files = config_image_files(spec.template.name, spec.template.config_files())
        # A pool's member is made ahead of any request, so it reads the base image as it is now:
        # one made after a rebuild runs the new image, as the pool sweep (which reads it past
        # this cache too) expects, instead of the cached one for up to _BASE_ID_SECONDS.
        base_id = self._base_id(client, image_for(spec), fresh=spec.pooled)
        return config_image_tag(base_id, spec.template.name, files), files

    def create(
        self, client: docker.DockerClient, spec: LaunchSpec, *, network_known: bool = False
    ) -> str:
        """Create the container; returns its id. Through the engine API's create alone (the
        SDK's ``containers.create`` inspects the new container after it: one call more).
        ``NameTaken`` when a container of that name exists."""
        attachment = docker_networks.attach(client, spec, known=network_known)
        env = environment(spec, host_net=attachment.host_net)
        if attachment.platform_url is not None:
            env["PLATFORM_URL"] = attachment.platform_url
        # The agent picks its HTTP client by it (agent.sh); templates may read it too.
        env["WORKSPACE_SANDBOX"] = spec.sandbox
        resource_limits = limits(spec)
        if spec.sandbox == "gvisor":
            # The engine's pids limit counts the sandbox's own threads here, not the
            # workspace's processes (settings: DOCKER_GVISOR_PIDS).
            resource_limits["pids_limit"] = settings.DOCKER_GVISOR_PIDS
        host_config = client.api.create_host_config(
            # The engine creates the config volume with the container (with these labels; a new
            # volume takes the owner and mode of the image's folder) or mounts the existing one,
            # contents kept: no engine call of its own.
            mounts=[
                Mount(
                    target=config_mount(spec),
                    source=volume_name(spec.workspace_id),
                    type="volume",
                    labels=labels(spec.workspace_id),
                )
            ],
            network_mode=attachment.network_mode,
            # Least privilege: a non-root user, no setuid gains, no capabilities at all (the
            # agent needs none), and bounded memory, CPU and processes.
            security_opt=["no-new-privileges:true"],
            cap_drop=["ALL"],
            runtime=runtime_for(spec.sandbox),
            **resource_limits,
        )
        disabled = attachment.disabled
        if not config_in_image(spec):
            return self._create_container(client, spec, image_for(spec), env, host_config, disabled)
        image, files = self._config_image(client, spec)
        try:
            return self._create_container(client, spec, image, env, host_config, disabled)
        except _ImageMissing:
            pass
        # The template's config image is not on this engine yet (a new template, a changed
        # file, a rebuilt agent image, a pruned engine): built once, then every create uses it.
        build_config_image(client, image, image_for(spec), files)
        return self._create_container(client, spec, image, env, host_config, disabled)

    def _create_container(
        self,
        client: docker.DockerClient,
        spec: LaunchSpec,
        image: str,
        env: dict[str, str],
        host_config: Any,
        network_disabled: bool = False,
    ) -> str:
        with engine_errors(f"creating container {spec.name} from {image}"):
            try:
                created = client.api.create_container(
                    image,
                    name=spec.name,
                    labels={
                        **labels(spec.workspace_id, spec.generation),
                        label("template"): spec.template.name,
                    },
                    environment=env,
                    user=settings.DOCKER_WORKSPACE_USER,
                    stop_signal="SIGTERM",
                    # The template's command runs instead of the platform's agent (the image's
                    # entrypoint).
                    entrypoint=list(spec.template.command) if spec.template.command else None,
                    host_config=host_config,
                    network_disabled=network_disabled,
                )
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise NameTaken(spec.name) from exc
                if exc.status_code == 404 and image != image_for(spec):
                    raise _ImageMissing(image) from exc
                raise
        return str(created["Id"])
