"""The Docker backend: each workspace is a container ``ws-<id>`` on a Docker engine.

Modelled on JupyterHub's DockerSpawner: fixed names (container ``ws-<id>``, config volume
``ws-<id>-configs``), get-or-create, NotFound on remove means done. Every object carries
``<prefix>.platform=<PLATFORM_ID>``, ``<prefix>.workspace-id`` and ``<prefix>.generation``
labels, so the backend finds its instances without any saved state (a killed worker may have
created a container whose state was never saved) and never touches another platform's objects.

The engine is reached with ``DOCKER_HOST`` (unix or tcp) and no registry: images are built
locally (``manage.py build_agent_image``) and never pulled.

Isolation (``DOCKER_NETWORK_MODE``): with ``veth`` (the default) a container is created with
networking disabled and, once it runs, given a link of its own to the host (``veth.wire``: a veth
pair whose host end is named ``DOCKER_BRIDGE_PREFIX`` + the id's start, a /31 of
``DOCKER_VETH_SUBNET`` picked by the workspace's isolation uid). With ``workspace`` each workspace
gets its own internal bridge network ``ws-<id>-net`` (labelled like the container, removed with
it and by orphan removal), its bridge named the same way. Either way workspaces cannot reach one
another nor anything outside the host; of the host, only the registry listener's port at the
workspace's gateway address (``PLATFORM_URL``'s host is replaced by the gateway): the host
firewall (``docker_firewall.bridge_rules``, ``DOCKER_HOST_FIREWALL``) refuses everything else
that comes in from such an interface, so a service listening on all the host's addresses is not
reachable either.
Containers run as ``DOCKER_WORKSPACE_USER`` with ``no-new-privileges``, every
capability dropped and the manifest's ``resources`` (or the ``DOCKER_DEFAULT_*`` limits).
``DOCKER_NETWORK_MODE=host`` is the documented opt-out.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import posixpath
import re
import signal
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse, urlunparse
from uuid import UUID

import docker
import docker.errors
import requests.exceptions
from django.conf import settings
from docker.models.containers import Container
from docker.types import Mount

from provisioning.backends import docker_firewall, follow, veth
from provisioning.backends.base import (
    CONFIG_MARKER,
    BackendError,
    BackendUnavailable,
    ConfigState,
    InstanceInfo,
    InstanceStatus,
    LaunchSpec,
    LogItem,
    State,
    TransientBackendError,
    WorkspaceBackend,
    last_lines,
)

logger = logging.getLogger(__name__)

# Engine errors in the 5xx range that retrying cannot fix (a bad image command, a bad mount).
_PERMANENT_SERVER_ERRORS = re.compile(
    r"OCI runtime|executable file not found|no such file or directory|invalid mount|"
    r"invalid reference format|not a directory",
    re.IGNORECASE,
)
_CREATE_ATTEMPTS = 3
# How long a base image's id is trusted before it is read again (a rebuilt agent image reaches
# new config images within this time).
_BASE_ID_SECONDS = 60.0
# The label the engine puts on the container of a Swarm task.
_SWARM_TASK_LABEL = "com.docker.swarm.task.id"
# The bridge driver's option naming the network's Linux bridge.
_BRIDGE_OPTION = "com.docker.network.bridge.name"
_warned: set[str] = set()


class _NameTaken(Exception):
    """The engine refused a create: a container of that name exists."""


class _ImageMissing(Exception):
    """The engine refused a create: it does not have the config image."""


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


# States in which the container's processes exist: paused is silent (the liveness window's
# business, like a SIGSTOPped process), not dead.
_ALIVE = frozenset({"running", "paused"})
_EXITED = re.compile(r"Exited \((-?\d+)\)")


def _label(key: str) -> str:
    return f"{settings.DOCKER_LABEL_PREFIX}.{key}"


def platform_filter() -> str:
    """The label filter that selects this platform's containers and volumes."""
    return f"{_label('platform')}={settings.PLATFORM_ID}"


def workspace_filter(workspace_id: UUID | str) -> str:
    return f"{_label('workspace-id')}={workspace_id}"


def engine_url(host: str | None = None) -> str:
    host = settings.DOCKER_HOST if host is None else host
    return str(host or "the default socket (unix:///var/run/docker.sock)")


def make_client(host: str | None = None) -> docker.DockerClient:
    """A client for the engine at ``host`` (default DOCKER_HOST). Only this module constructs
    one (a test checks)."""
    host = settings.DOCKER_HOST if host is None else host
    client = docker.DockerClient(
        base_url=host or None,
        version=settings.DOCKER_API_VERSION,
        timeout=settings.DOCKER_TIMEOUT_SECONDS,
    )
    if client.api.base_url.startswith("http+docker://localhost"):
        # A local socket: no HTTP proxy applies, so requests need not read the proxy variables
        # of the environment on every engine call (a few ms of CPU per provision).
        client.api.trust_env = False
    return client


def _root_cause(exc: BaseException) -> str:
    """A short reason for an engine failure: the OS error underneath requests' wrapping when
    there is one (``No such file or directory``, ``Connection refused``), else the message."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        queue.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                queue.append(linked)
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {settings.DOCKER_TIMEOUT_SECONDS} s"
    return str(exc) or exc.__class__.__name__


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc)


@contextlib.contextmanager
def engine_errors(doing: str, host: str | None = None) -> Iterator[None]:
    """Turn engine failures into user-facing backend errors. Connection failures, timeouts and
    engine 5xx answers are transient (the task retries with a limit); the rest are not.
    ``host`` is the engine named in the message (default DOCKER_HOST)."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise BackendError(
            f"docker: {doing}: image not found on the engine ({_explain(exc)}); no registry is "
            "used: build it with `python manage.py build_agent_image` or load it into the engine"
        ) from exc
    except docker.errors.APIError as exc:
        message = f"docker: {doing}: {_explain(exc)}"
        if exc.is_server_error() and not _PERMANENT_SERVER_ERRORS.search(message):
            raise TransientBackendError(message) from exc
        raise BackendError(message) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientBackendError(
            f"docker: {doing}: cannot reach the engine at {engine_url(host)}: {_root_cause(exc)}"
        ) from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"docker: {doing}: {_root_cause(exc)}") from exc


def _safe_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise BackendError(f"template file {path!r} escapes the config folder")
    return pure.as_posix()


def workspace_user_ids() -> tuple[int, int]:
    """DOCKER_WORKSPACE_USER as numbers (``uid[:gid]``): the owner of the config files the
    platform writes, so the non-root agent can use (and change) them."""
    user, _, group = str(settings.DOCKER_WORKSPACE_USER).partition(":")
    try:
        uid = int(user)
        return uid, int(group) if group else uid
    except ValueError:
        raise BackendError(
            f"DOCKER_WORKSPACE_USER={settings.DOCKER_WORKSPACE_USER!r} must be numeric uid[:gid]"
        ) from None


def _tar(files: Mapping[str, bytes], mtime: float) -> bytes:
    owner = workspace_user_ids()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        directories: set[str] = set()
        for relative, content in files.items():
            name = _safe_relative(relative)
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


class DockerBackend(WorkspaceBackend):
    name = "docker"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: docker.DockerClient | None = None
        # Containers this process's prepare made or adopted, by id: the fingerprint of the env
        # they carry (in memory only, never saved). start() starts such a container by id with
        # no lookup when its spec carries the same env.
        self._prepared: dict[str, int] = {}
        # The base image's id by reference, with when it was read (config image tags name it).
        self._base_ids: dict[str, tuple[str, float]] = {}

    # -- the engine ----------------------------------------------------------------------------
    def engine_host(self) -> str:
        """The engine this backend talks to (DOCKER_HOST; the Swarm backend: its manager)."""
        return str(settings.DOCKER_HOST)

    @property
    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                # Construction may ask the engine for its API version. Unreachable is
                # BackendUnavailable in check_available and transient mid-cycle, like any
                # connection failure.
                host = self.engine_host()
                try:
                    self._client = make_client(host)
                except (docker.errors.DockerException, requests.RequestException) as exc:
                    raise TransientBackendError(
                        f"docker: cannot reach the engine at {engine_url(host)}: {_root_cause(exc)}"
                    ) from exc
            return self._client

    def app_address(self, workspace_id: UUID, state: State, port: int) -> str:
        # With host networking the app listens on the host's loopback; a container on a network
        # of the platform's making is reached at the address recorded in its state.
        return f"{state.get('address') or settings.DOCKER_APP_HOST}:{port}"

    def check_available(self) -> None:
        if self._wired():
            try:
                veth.check()
            except veth.VethError as exc:
                raise BackendUnavailable(self.name, f"DOCKER_NETWORK_MODE=veth: {exc}") from exc
        try:
            self.client.ping()
        except (BackendError, docker.errors.DockerException, requests.RequestException) as exc:
            cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ else exc
            raise BackendUnavailable(
                self.name,
                f"cannot reach the Docker engine at {engine_url(self.engine_host())}: "
                f"{_root_cause(cause)}",
            ) from exc

    # -- names and labels ----------------------------------------------------------------------
    @staticmethod
    def container_name(workspace_id: UUID | str) -> str:
        return f"ws-{workspace_id}"

    @classmethod
    def volume_name(cls, workspace_id: UUID | str) -> str:
        return f"{cls.container_name(workspace_id)}-configs"

    @staticmethod
    def _labels(workspace_id: UUID | str, generation: int | None = None) -> dict[str, str]:
        labels = {
            _label("platform"): settings.PLATFORM_ID,
            _label("workspace-id"): str(workspace_id),
        }
        if generation is not None:
            labels[_label("generation")] = str(generation)
        return labels

    @classmethod
    def network_name(cls, workspace_id: UUID | str) -> str:
        return f"{cls.container_name(workspace_id)}-net"

    @staticmethod
    def bridge_name(workspace_id: UUID | str) -> str:
        """The Linux bridge of the workspace's network (veth: the host end of its link):
        ``DOCKER_BRIDGE_PREFIX`` and the start of the id, 15 characters (the kernel's limit),
        matched by the host firewall's wildcard."""
        prefix = settings.DOCKER_BRIDGE_PREFIX
        return prefix + str(workspace_id).replace("-", "")[: 15 - len(prefix)]

    @staticmethod
    def _own_network() -> bool:
        return bool(settings.DOCKER_NETWORK_MODE == "workspace")

    def _wired(self) -> bool:
        """Whether containers get a veth link of the platform's making (``veth`` mode)."""
        return bool(settings.DOCKER_NETWORK_MODE == "veth")

    @staticmethod
    def _link(spec: LaunchSpec) -> veth.Pair:
        """The addresses of the workspace's link: the /31 its isolation uid's offset picks."""
        low, high = settings.WORKSPACE_UID_RANGE
        if spec.uid is None or not low <= spec.uid <= high:
            raise BackendError(
                f"docker: DOCKER_NETWORK_MODE=veth picks a workspace's addresses by its isolation "
                f"uid, and {spec.uid} is not one of WORKSPACE_UID_RANGE={low}-{high}"
            )
        return veth.pair(settings.DOCKER_VETH_SUBNET, spec.uid - low)

    def _wire(self, container: Container, spec: LaunchSpec) -> veth.Pair:
        link = self._link(spec)
        pid = int(container.attrs.get("State", {}).get("Pid") or 0)
        try:
            veth.wire(pid, str(container.id), self.bridge_name(spec.workspace_id), link)
        except veth.VethError as exc:
            raise BackendError(f"docker: cannot wire container {spec.name}: {exc}") from exc
        return link

    def _ensure_network(self, spec: LaunchSpec, *, known: bool) -> dict[str, Any]:
        """Get or create the workspace's internal network; returns its engine attributes. One
        engine call when an earlier instance used it (``known``: inspected by name), two on a
        first provision (created, then inspected; the engine refuses a duplicate name: 409)."""
        name = self.network_name(spec.workspace_id)
        labels = {"label": [platform_filter(), workspace_filter(spec.workspace_id)]}
        if known:
            with engine_errors(f"inspecting network {name}"):
                try:
                    attrs = dict(self.client.api.inspect_network(name))
                except docker.errors.NotFound:
                    attrs = {}
            mine = attrs.get("Labels") or {}
            if attrs.get("Name") == name and all(
                mine.get(key) == value for key, value in self._labels(spec.workspace_id).items()
            ):
                return attrs
        for _attempt in range(_CREATE_ATTEMPTS):
            with engine_errors(f"creating network {name}"):
                try:
                    created = self.client.api.create_network(
                        name,
                        driver="bridge",
                        internal=True,
                        options={_BRIDGE_OPTION: self.bridge_name(spec.workspace_id)},
                        labels=self._labels(spec.workspace_id),
                        check_duplicate=True,
                    )
                    return dict(self.client.api.inspect_network(created["Id"]))
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:
                        raise
            # An earlier cycle's (or a racing cycle's) network of that name.
            with engine_errors(f"listing networks for {name}"):
                found = self.client.api.networks(names=[name], filters=labels)
            for network in found:
                if network.get("Name") == name:
                    with engine_errors(f"inspecting network {name}"):
                        try:
                            return dict(self.client.api.inspect_network(network["Id"]))
                        except docker.errors.NotFound:
                            break  # removed meanwhile: create again
        raise BackendError(f"docker: could not create network {name}")

    def _remove_networks(self, workspace_id: UUID | str) -> None:
        labels = {"label": [platform_filter(), workspace_filter(workspace_id)]}
        with engine_errors(f"listing the networks of {workspace_id}"):
            networks = self.client.api.networks(filters=labels)
        for network in networks:
            with (
                engine_errors(f"removing network {network.get('Name')}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.client.api.remove_network(network["Id"])

    @classmethod
    def ensure_bridge_firewall(cls, network: Mapping[str, Any], platform_url: str) -> None:
        """Confirm the host firewall covers the workspace's bridge (``DOCKER_HOST_FIREWALL``):
        from the bridge, only the port of ``platform_url`` on the host's addresses."""
        mode = settings.DOCKER_HOST_FIREWALL
        if mode == "off":
            return
        bridge = (network.get("Options") or {}).get(_BRIDGE_OPTION) or ""
        if (
            not bridge.startswith(settings.DOCKER_BRIDGE_PREFIX)
            or not Path("/sys/class/net", bridge).exists()
        ):
            where = (
                f"network {network.get('Name')}'s bridge {bridge or '(unnamed)'} is not on this "
                "host (a remote engine?)"
            )
            if mode == "on":
                raise BackendError(
                    f"docker: {where}; DOCKER_HOST_FIREWALL=on needs the engine on this host"
                )
            _warn_once(
                "docker: workspace bridges are not on this host (a remote engine?): its host "
                "must refuse what they send except the registry port (README, Workspace isolation)"
            )
            return
        cls._install_bridge_firewall(platform_url)

    @staticmethod
    def _install_bridge_firewall(platform_url: str) -> None:
        """The rules for every interface named ``DOCKER_BRIDGE_PREFIX``*: workspace bridges and
        the host ends of veth links alike (one chain, installed once per process)."""
        parsed = urlparse(platform_url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            docker_firewall.ensure_bridge_firewall(port)
        except docker_firewall.FirewallError as exc:
            raise BackendError(
                f"docker: cannot install the workspace bridge firewall (chain "
                f"{docker_firewall.bridge_chain(settings.WORKSPACE_FIREWALL_CHAIN)}): {exc}; "
                "without it workspaces reach every host service listening on all addresses. "
                "DOCKER_HOST_FIREWALL=off if the engine's host is firewalled otherwise"
            ) from exc

    @staticmethod
    def _gateway(network: Mapping[str, Any]) -> str:
        for config in (network.get("IPAM") or {}).get("Config") or []:
            if config.get("Gateway"):
                return str(config["Gateway"])
        raise BackendError(
            f"docker: network {network.get('Name')} has no gateway address; the agent could not "
            "reach the platform"
        )

    @staticmethod
    def platform_url_via(url: str, gateway: str) -> str:
        """PLATFORM_URL as a workspace on that network sees it: the host part replaced by the
        network's gateway (the host's address on the bridge), the port and path kept."""
        parsed = urlparse(url)
        port = f":{parsed.port}" if parsed.port else ""
        host = f"[{gateway}]" if ":" in gateway else gateway
        return urlunparse(parsed._replace(netloc=f"{host}{port}"))

    @staticmethod
    def _limits(spec: LaunchSpec) -> dict[str, Any]:
        resources = spec.template.resources
        cpus = resources.cpus or settings.DOCKER_DEFAULT_CPUS
        return {
            "mem_limit": resources.memory or settings.DOCKER_DEFAULT_MEMORY,
            "nano_cpus": int(cpus * 1e9),
            "pids_limit": resources.pids or settings.DOCKER_DEFAULT_PIDS,
        }

    @staticmethod
    def _mount(spec: LaunchSpec) -> str:
        return spec.template.config_mount or settings.DOCKER_CONFIG_MOUNT

    @staticmethod
    def _image(spec: LaunchSpec) -> str:
        return spec.template.image or settings.DOCKER_AGENT_IMAGE

    def config_in_image(self, spec: LaunchSpec) -> bool:
        # The agent reports the engine's copy; a template's own command runs no agent.
        return settings.DOCKER_CONFIG_DELIVERY == "image" and not spec.template.command

    def _base_id(self, base: str) -> str:
        known = self._base_ids.get(base)
        if known is not None and time.monotonic() - known[1] < _BASE_ID_SECONDS:
            return known[0]
        with engine_errors(f"inspecting image {base}"):
            image_id = str(self.client.api.inspect_image(base)["Id"])
        self._base_ids[base] = (image_id, time.monotonic())
        return image_id

    def _config_image(self, spec: LaunchSpec) -> tuple[str, dict[str, bytes]]:
        """The tag of the template's config image (FROM the base image) and its files."""
        from provisioning.backends.agent_image import config_image_files, config_image_tag

        files = config_image_files(spec.template.name, spec.template.config_files())
        base_id = self._base_id(self._image(spec))
        return config_image_tag(base_id, spec.template.name, files), files

    def _find(self, workspace_id: UUID | str) -> Container | None:
        with engine_errors(f"inspecting container {self.container_name(workspace_id)}"):
            try:
                return self.client.containers.get(self.container_name(workspace_id))
            except docker.errors.NotFound:
                return None

    def _remove_container(self, container: Container) -> None:
        with (
            engine_errors(f"removing container {container.name}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            container.remove(force=True)

    def _environment(self, spec: LaunchSpec, *, host_net: bool) -> dict[str, str]:
        """The instance's environment: the spec's, where its config is mounted, and where its
        app listens. On the host's network the app must listen on loopback only, or it would be
        reachable around the proxy; an instance with an address of its own is reached there."""
        environment = {**spec.env, "WORKSPACE_CONFIG_DIR": self._mount(spec)}
        if "WORKSPACE_APP_PORT" in spec.env:
            environment["WORKSPACE_APP_HOST"] = "127.0.0.1" if host_net else "0.0.0.0"
        return environment

    def _create(self, spec: LaunchSpec, *, network_known: bool = False) -> str:
        """Create the container; returns its id. Through the engine API's create alone (the
        SDK's ``containers.create`` inspects the new container after it: one call more)."""
        mount = self._mount(spec)
        # disabled: no network of the engine's (a namespace with lo alone, and no prestart
        # hook), the link made by _wire once the container runs.
        disabled, own_network = self._wired(), self._own_network()
        environment = self._environment(spec, host_net=not (disabled or own_network))
        platform_url = spec.env.get("PLATFORM_URL") or settings.PLATFORM_URL
        network_mode, gateway = "host", None
        if disabled:
            gateway = self._link(spec).gateway
            if settings.DOCKER_HOST_FIREWALL != "off":
                self._install_bridge_firewall(platform_url)
            network_mode = "none"
        elif own_network:
            attrs = self._ensure_network(spec, known=network_known)
            self.ensure_bridge_firewall(attrs, platform_url)
            gateway = self._gateway(attrs)
            network_mode = self.network_name(spec.workspace_id)
        if gateway is not None:
            environment["PLATFORM_URL"] = self.platform_url_via(platform_url, gateway)
        host_config = self.client.api.create_host_config(
            # The engine creates the config volume with the container (with these labels; a new
            # volume takes the owner and mode of the image's folder) or mounts the existing one,
            # contents kept: no engine call of its own.
            mounts=[
                Mount(
                    target=mount,
                    source=self.volume_name(spec.workspace_id),
                    type="volume",
                    labels=self._labels(spec.workspace_id),
                )
            ],
            network_mode=network_mode,
            # Least privilege: a non-root user, no setuid gains, no capabilities at all (the
            # agent needs none), and bounded memory, CPU and processes.
            security_opt=["no-new-privileges:true"],
            cap_drop=["ALL"],
            **self._limits(spec),
        )
        if not self.config_in_image(spec):
            return self._create_container(
                spec, self._image(spec), environment, host_config, disabled
            )
        image, files = self._config_image(spec)
        try:
            return self._create_container(spec, image, environment, host_config, disabled)
        except _ImageMissing:
            pass
        # The template's config image is not on this engine yet (a new template, a changed
        # file, a rebuilt agent image, a pruned engine): built once, then every create uses it.
        from provisioning.backends.agent_image import build_config_image

        build_config_image(self.client, image, self._image(spec), files)
        return self._create_container(spec, image, environment, host_config, disabled)

    def _create_container(
        self,
        spec: LaunchSpec,
        image: str,
        environment: dict[str, str],
        host_config: Any,
        network_disabled: bool = False,
    ) -> str:
        with engine_errors(f"creating container {spec.name} from {image}"):
            try:
                created = self.client.api.create_container(
                    image,
                    name=spec.name,
                    labels={
                        **self._labels(spec.workspace_id, spec.generation),
                        _label("template"): spec.template.name,
                    },
                    environment=environment,
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
                    raise _NameTaken(spec.name) from exc
                if exc.status_code == 404 and image != self._image(spec):
                    raise _ImageMissing(image) from exc
                raise
        return str(created["Id"])

    def _container_for(self, spec: LaunchSpec) -> Container:
        container = self._find(spec.workspace_id)
        if container is None:
            raise self._gone(spec)
        return container

    @staticmethod
    def _state(container: Container, generation: int) -> State:
        # Never the environment: it holds the agent token and the user's secrets.
        return {"container_id": container.id, "generation": generation}

    def _generation_of(self, container: Container) -> int | None:
        value = (container.labels or {}).get(_label("generation"))
        return int(value) if value and value.isdigit() else None

    @staticmethod
    def _fingerprint(spec: LaunchSpec) -> int:
        return hash((spec.generation, frozenset(spec.env.items())))

    def _prepared_as(self, container_id: str, spec: LaunchSpec) -> State:
        if len(self._prepared) > 1024:  # cycles that never reached start (failed, killed)
            self._prepared.clear()
        self._prepared[container_id] = self._fingerprint(spec)
        return {"container_id": container_id, "generation": spec.generation}

    def _env_matches(self, container: Container, spec: LaunchSpec) -> bool:
        current = set(container.attrs.get("Config", {}).get("Env") or [])
        # PLATFORM_URL is rewritten per network (its gateway), so it is not compared.
        return all(
            f"{key}={value}" in current for key, value in spec.env.items() if key != "PLATFORM_URL"
        )

    # -- contract ------------------------------------------------------------------------------
    def prepare(self, spec: LaunchSpec, state: State) -> State:
        """Create this generation's container (and with it, the config volume). The one a
        previous cycle recorded in ``state`` is removed by id first (a restart: one call, no
        lookup); a container found under the name afterwards (a killed cycle's, never recorded)
        is adopted when it is this generation's and unstarted with this env, else replaced."""
        previous = state.get("container_id")
        if previous and state.get("generation") != spec.generation:
            with (
                engine_errors(f"removing container {spec.name}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.client.api.remove_container(previous, force=True)
        for _attempt in range(_CREATE_ATTEMPTS):
            try:
                created = self._create(spec, network_known=bool(state.get("network")))
                return self._prepared_as(created, spec)
            except _NameTaken:
                pass
            container = self._find(spec.workspace_id)
            if container is None:
                continue  # removed meanwhile: create again
            adoptable = (
                self._generation_of(container) == spec.generation
                and container.status == "created"
                and self._env_matches(container, spec)
            )
            if adoptable:
                return self._prepared_as(str(container.id), spec)
            # An earlier (or killed) cycle's container: replaced, never a name conflict.
            self._remove_container(container)
        raise BackendError(f"docker: could not create container {spec.name}")

    def _gone(self, spec: LaunchSpec) -> BackendError:
        return BackendError(f"docker: container {spec.name} is gone; the next cycle recreates it")

    def config_state(self, spec: LaunchSpec, state: State) -> ConfigState:
        marker = posixpath.join(self._mount(spec), CONFIG_MARKER)
        # By name, with no inspect first: a 404 means no marker or no container, told apart
        # only on that (rare) path.
        with engine_errors(f"reading the config volume of {spec.name}"):
            try:
                stream, _ = self.client.api.get_archive(spec.name, marker)
            except docker.errors.NotFound:
                self._container_for(spec)
                return ConfigState.EMPTY
            for _chunk in stream:
                pass
        return ConfigState.PROVISIONED

    def write_config(self, spec: LaunchSpec, state: State, files: Mapping[str, bytes]) -> None:
        mount = self._mount(spec)
        marker = json.dumps({"template": spec.template.name, "generation": spec.generation})
        payload = {name: data for name, data in files.items() if name != CONFIG_MARKER}
        # One archive, the marker its last entry: the engine extracts entries in order, so an
        # interrupted copy leaves no marker, reads as EMPTY and is redone. Each put_archive on a
        # created container mounts its file systems, the costliest engine call of a cycle.
        payload[CONFIG_MARKER] = marker.encode()
        with engine_errors(f"writing the config volume of {spec.name}"):
            try:
                accepted = self.client.api.put_archive(spec.name, mount, _tar(payload, time.time()))
            except docker.errors.NotFound as exc:
                raise self._gone(spec) from exc
        if not accepted:
            raise BackendError(f"docker: the engine refused the config files for {spec.name}")

    def start(self, spec: LaunchSpec, state: State) -> State:
        container_id = str(state.get("container_id") or "")
        made = self._prepared.pop(container_id, None)
        if made is not None and made == self._fingerprint(spec):
            # This process's prepare made (or adopted) it for this generation with this env and
            # token (ids are never reused): start it by id; the inspect that follows confirms it.
            with engine_errors(f"starting container {spec.name}"):
                try:
                    self.client.api.start(container_id)
                    container = self.client.containers.get(container_id)
                except docker.errors.NotFound:
                    container = None
            if container is not None and self._generation_of(container) == spec.generation:
                return self._wait_running(container, spec, reloaded=True)
        container = self._find(spec.workspace_id)
        current = (
            container is not None
            and self._generation_of(container) == spec.generation
            and self._env_matches(container, spec)
        )
        if container is None or not current:
            # Replace, never duplicate: the container must carry this cycle's env and token.
            state = self.prepare(spec, state)
            container = self._container_for(spec)
        assert container is not None
        if container.status != "running":
            with engine_errors(f"starting container {spec.name}"):
                container.start()
        return self._wait_running(container, spec)

    def _wait_running(
        self, container: Container, spec: LaunchSpec, *, reloaded: bool = False
    ) -> State:
        deadline = time.monotonic() + settings.DOCKER_START_WAIT_SECONDS
        delay = 0.05
        while True:
            if not reloaded:
                with engine_errors(f"inspecting container {spec.name}"):
                    container.reload()
            reloaded = False
            status = container.status
            if status == "running":
                address = (
                    {
                        "network": self.bridge_name(spec.workspace_id),
                        "address": self._wire(container, spec).address,
                    }
                    if self._wired()
                    else self._address(container, spec)
                )
                return {
                    **self._state(container, spec.generation),
                    **address,
                    "started_at": time.time(),
                }
            if status in ("exited", "dead"):
                code = container.attrs.get("State", {}).get("ExitCode")
                raise BackendError(
                    f"docker: container {spec.name} exited at once with code {code}"
                    f"{self._tail(container)}"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"docker: container {spec.name} is {status!r}, not running, after "
                    f"{settings.DOCKER_START_WAIT_SECONDS} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _address(self, container: Container, spec: LaunchSpec) -> State:
        """Where the container's ports are reached from the host: its address on its network
        (the reverse proxy routes there); none with host networking (127.0.0.1 then)."""
        if not self._own_network():
            return {"network": "host", "address": "127.0.0.1"}
        name = self.network_name(spec.workspace_id)
        networks = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
        address = (networks.get(name) or {}).get("IPAddress") or ""
        return {"network": name, "address": address}

    @staticmethod
    def _tail(container: Container, lines: int = 5) -> str:
        try:
            output = container.logs(tail=lines).decode(errors="replace").strip()
        except (docker.errors.DockerException, requests.RequestException):
            return ""
        return f"; last output: {output}" if output else ""

    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
        container = self._find(workspace_id)
        if container is None:
            return {}
        generation = self._generation_of(container)
        if container.status in ("running", "restarting", "paused"):
            with engine_errors(f"stopping container {container.name}"):
                try:
                    # The engine sends SIGTERM, then SIGKILL after the grace period.
                    container.stop(timeout=math.ceil(grace_seconds))
                except docker.errors.NotFound:
                    return {}
        return {"container_id": container.id, "generation": generation}

    def remove(self, workspace_id: UUID, state: State) -> None:
        container = self._find(workspace_id)
        if container is not None:
            self._remove_container(container)
        name = self.volume_name(workspace_id)
        with (
            engine_errors(f"removing volume {name}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            self.client.volumes.get(name).remove(force=True)
        # After the container: a network with an endpoint attached cannot be removed.
        self._remove_networks(workspace_id)
        self._unwire(workspace_id)

    def _unwire(self, workspace_id: UUID | str) -> None:
        """Delete the host end of the workspace's link, if it outlived its container (the
        kernel deletes a pair with the container's namespace, not always at once)."""
        if not self._wired():
            return
        try:
            veth.unwire(self.bridge_name(workspace_id))
        except veth.VethError as exc:
            raise BackendError(f"docker: {exc}") from exc

    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        container = self._find(workspace_id)
        if container is None:
            return InstanceStatus(exists=False, running=False, detail="no container")
        status = container.status
        exit_code = None
        detail = f"container {container.name} is {status}"
        tail = ""
        if status in ("exited", "dead"):
            facts = container.attrs.get("State", {})
            exit_code = facts.get("ExitCode")
            detail = f"container {container.name} {_exit_reason(status, exit_code, facts)}"
            tail = self._output_tail(container)
        return InstanceStatus(
            exists=True,
            running=status in _ALIVE,
            exit_code=exit_code,
            detail=detail,
            output_tail=tail,
        )

    def logs(self, workspace_id: UUID, state: State, tail: int, max_bytes: int) -> str:
        container = self._find(workspace_id)
        if container is None or tail <= 0:
            return ""
        with engine_errors(f"reading the logs of {container.name}"):
            try:
                data = container.logs(stdout=True, stderr=True, tail=tail)
            except docker.errors.NotFound:
                return ""
        return last_lines(data, tail, max_bytes)

    def follow_logs(
        self,
        workspace_id: UUID,
        state: State,
        *,
        tail: int,
        max_bytes: int,
        max_line_bytes: int,
        poll_seconds: float,
    ) -> AsyncIterator[LogItem]:
        name = self.container_name(workspace_id)

        def look() -> follow.Seen:
            container = self._find(workspace_id)
            if container is None:
                return follow.Seen(None, False, "no container")
            facts = container.attrs.get("State", {})
            # A restart in place keeps the id and changes StartedAt: both name one run.
            key = (container.id, facts.get("StartedAt"))
            if container.status in _ALIVE:
                return follow.Seen(key, True, f"container {name} is {container.status}")
            reason = _exit_reason(container.status, facts.get("ExitCode"), facts)
            return follow.Seen(key, False, f"container {name} {reason}")

        return follow.follow_engine(
            self.engine_host(),
            look,
            lambda count, since: follow.log_path("containers", name, tail=count, since=since),
            tail=tail,
            max_bytes=max_bytes,
            max_line_bytes=max_line_bytes,
            poll_seconds=poll_seconds,
        )

    def _output_tail(self, container: Any) -> str:
        """The last lines of the container's output, for death events; empty if unreadable."""
        lines = settings.DEATH_OUTPUT_LINES
        if lines <= 0:
            return ""
        try:
            raw = container.logs(tail=lines, stdout=True, stderr=True)
        except (docker.errors.DockerException, requests.RequestException):
            return ""
        return bytes(raw).decode(errors="replace").rstrip("\n")

    def list_instances(self) -> list[InstanceInfo]:
        # Two engine calls whatever the number of workspaces: the container list carries labels,
        # state and the exit code in its Status text (no per-container inspect), and the volume
        # list finds config volumes whose container is gone (an interrupted removal), so orphan
        # volumes are removed too.
        labelled = {"label": platform_filter()}
        with engine_errors("listing containers"):
            rows = self.client.api.containers(all=True, filters=labelled)
        with engine_errors("listing volumes"):
            volumes = self.client.api.volumes(filters=labelled).get("Volumes") or []
        found: dict[str, InstanceInfo] = {}
        for row in rows:
            labels = row.get("Labels") or {}
            workspace_id = labels.get(_label("workspace-id"))
            # A Swarm task's container carries its service's labels: it is the Swarm backend's
            # (the same engine may be a manager), never a Docker orphan to remove.
            if not workspace_id or _SWARM_TASK_LABEL in labels:
                continue
            generation = labels.get(_label("generation"), "")
            exit_code = None
            match = _EXITED.match(row.get("Status") or "")
            if match:
                exit_code = int(match.group(1))
            info = InstanceInfo(
                workspace_id=workspace_id,
                running=row.get("State") in _ALIVE,
                generation=int(generation) if generation.isdigit() else None,
                ref=str(row.get("Id", "")),
                exit_code=exit_code,
            )
            # Names are fixed (ws-<id>), so two containers for one id only exist when someone
            # made one by hand with our labels; a running one is the one that matters.
            if workspace_id not in found or info.running:
                found[workspace_id] = info
        for volume in volumes:
            workspace_id = (volume.get("Labels") or {}).get(_label("workspace-id"))
            if workspace_id and workspace_id not in found:
                found[workspace_id] = InstanceInfo(
                    workspace_id=workspace_id, running=False, ref=f"volume {volume.get('Name')}"
                )
        # Networks left by an interrupted removal are orphans too (a third call, same reason).
        with engine_errors("listing networks"):
            networks = self.client.api.networks(filters=labelled)
        for network in networks:
            workspace_id = (network.get("Labels") or {}).get(_label("workspace-id"))
            if workspace_id and workspace_id not in found:
                found[workspace_id] = InstanceInfo(
                    workspace_id=workspace_id, running=False, ref=f"network {network.get('Name')}"
                )
        return list(found.values())

    def remove_orphan(self, instance: InstanceInfo) -> None:
        """Remove every container and volume of this platform labelled with the orphan's
        workspace id, whatever their names: an orphan made by hand need not be called ws-<id>,
        and a name alone could be another platform's object on a shared engine."""
        labels = {"label": [platform_filter(), workspace_filter(instance.workspace_id)]}
        with engine_errors(f"listing the containers of orphan {instance.workspace_id}"):
            containers = self.client.api.containers(all=True, filters=labels)
        for row in containers:
            with (
                engine_errors(f"removing orphan container {row.get('Id', '')[:12]}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.client.api.remove_container(row["Id"], force=True)
        # After the containers: a volume still mounted by one cannot be removed.
        with engine_errors(f"listing the volumes of orphan {instance.workspace_id}"):
            volumes = self.client.api.volumes(filters=labels).get("Volumes") or []
        for volume in volumes:
            with (
                engine_errors(f"removing orphan volume {volume.get('Name')}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.client.api.remove_volume(volume["Name"], force=True)
        self._remove_networks(instance.workspace_id)
        self._unwire(instance.workspace_id)


def _exit_reason(status: str, exit_code: int | None, facts: Mapping[str, Any]) -> str:
    """``exited with code 137 (SIGKILL; out of memory)``: what the reconciler records."""
    reasons = []
    if exit_code is not None and exit_code > 128:
        with contextlib.suppress(ValueError):
            reasons.append(signal.Signals(exit_code - 128).name)
    if facts.get("OOMKilled"):
        reasons.append("out of memory")
    if facts.get("Error"):
        reasons.append(str(facts["Error"]))
    text = f"{status} with code {exit_code}"
    return f"{text} ({'; '.join(reasons)})" if reasons else text
