"""The Docker backend: each workspace is a container ``ws-<id>`` on a Docker engine.

Modelled on JupyterHub's DockerSpawner: fixed names (container ``ws-<id>``, config volume
``ws-<id>-configs``), get-or-create, NotFound on remove means done. Every object carries
``<prefix>.platform=<PLATFORM_ID>``, ``<prefix>.workspace-id`` and ``<prefix>.generation``
labels, so the backend finds its instances without any saved state (a killed worker may have
created a container whose state was never saved) and never touches another platform's objects.

The engine is reached with ``DOCKER_HOST`` (unix or tcp) and no registry: images are built
locally (``manage.py build_agent_image``) and never pulled.
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
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from uuid import UUID

import docker
import docker.errors
import requests.exceptions
from django.conf import settings
from docker.models.containers import Container
from docker.types import Mount

from provisioning.agent import AGENT_SCRIPT
from provisioning.backends.base import (
    CONFIG_MARKER,
    BackendError,
    BackendUnavailable,
    ConfigState,
    InstanceInfo,
    InstanceStatus,
    LaunchSpec,
    State,
    TransientBackendError,
    WorkspaceBackend,
)

logger = logging.getLogger(__name__)

AGENT_SH = AGENT_SCRIPT.with_name("agent.sh")
# Engine errors in the 5xx range that retrying cannot fix (a bad image command, a bad mount).
_PERMANENT_SERVER_ERRORS = re.compile(
    r"OCI runtime|executable file not found|no such file or directory|invalid mount|"
    r"invalid reference format|not a directory",
    re.IGNORECASE,
)
_CREATE_ATTEMPTS = 3
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


def engine_url() -> str:
    return str(settings.DOCKER_HOST or "the default socket (unix:///var/run/docker.sock)")


def make_client() -> docker.DockerClient:
    """A client for the configured engine. Only this module constructs one (a test checks)."""
    return docker.DockerClient(
        base_url=settings.DOCKER_HOST or None,
        version=settings.DOCKER_API_VERSION,
        timeout=settings.DOCKER_TIMEOUT_SECONDS,
    )


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
def engine_errors(doing: str) -> Iterator[None]:
    """Turn engine failures into user-facing backend errors. Connection failures, timeouts and
    engine 5xx answers are transient (the task retries with a limit); the rest are not."""
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
            f"docker: {doing}: cannot reach the engine at {engine_url()}: {_root_cause(exc)}"
        ) from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"docker: {doing}: {_root_cause(exc)}") from exc


def _safe_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise BackendError(f"template file {path!r} escapes the config folder")
    return pure.as_posix()


def _tar(files: Mapping[str, bytes], mtime: float) -> bytes:
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
                archive.addfile(info)
                parent = posixpath.dirname(parent)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, int(mtime)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class DockerBackend(WorkspaceBackend):
    name = "docker"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: docker.DockerClient | None = None

    # -- the engine ----------------------------------------------------------------------------
    @property
    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                # Construction may ask the engine for its API version. Unreachable is
                # BackendUnavailable in check_available and transient mid-cycle, like any
                # connection failure.
                try:
                    self._client = make_client()
                except (docker.errors.DockerException, requests.RequestException) as exc:
                    raise TransientBackendError(
                        f"docker: cannot reach the engine at {engine_url()}: {_root_cause(exc)}"
                    ) from exc
            return self._client

    def check_available(self) -> None:
        try:
            self.client.ping()
        except (BackendError, docker.errors.DockerException, requests.RequestException) as exc:
            cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ else exc
            raise BackendUnavailable(
                self.name, f"cannot reach the Docker engine at {engine_url()}: {_root_cause(cause)}"
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

    @staticmethod
    def _mount(spec: LaunchSpec) -> str:
        return spec.template.config_mount or settings.DOCKER_CONFIG_MOUNT

    @staticmethod
    def _image(spec: LaunchSpec) -> str:
        return spec.template.image or settings.DOCKER_AGENT_IMAGE

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

    def _ensure_volume(self, spec: LaunchSpec) -> None:
        name = self.volume_name(spec.workspace_id)
        with engine_errors(f"creating volume {name}"):
            # Create is get-or-create on the engine: an existing volume of that name (an earlier
            # cycle's, or a racing creator's) comes back as it is, contents and labels kept.
            self.client.volumes.create(name=name, labels=self._labels(spec.workspace_id))

    def _create(self, spec: LaunchSpec) -> Container:
        mount = self._mount(spec)
        environment = {**spec.env, "WORKSPACE_CONFIG_DIR": mount}
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "labels": {
                **self._labels(spec.workspace_id, spec.generation),
                _label("template"): spec.template.name,
            },
            "environment": environment,
            "mounts": [
                Mount(target=mount, source=self.volume_name(spec.workspace_id), type="volume")
            ],
            "network_mode": settings.DOCKER_NETWORK_MODE,
            "stop_signal": "SIGTERM",
            "detach": True,
        }
        if spec.template.command:
            # The template's command runs instead of the platform's agent (the image's entrypoint).
            kwargs["entrypoint"] = list(spec.template.command)
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with engine_errors(f"creating container {spec.name} from {self._image(spec)}"):
                    return self.client.containers.create(self._image(spec), **kwargs)
            except BackendError as exc:
                conflict = isinstance(exc.__cause__, docker.errors.APIError) and (
                    exc.__cause__.status_code == 409
                )
                if not conflict or attempt == _CREATE_ATTEMPTS - 1:
                    raise
            # A container of that name appeared after we looked (a killed cycle's create
            # finishing late): it belongs to an older generation, so replace it.
            leftover = self._find(spec.workspace_id)
            if leftover is not None:
                self._remove_container(leftover)
        raise BackendError(f"docker: could not create container {spec.name}")  # pragma: no cover

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

    def _env_matches(self, container: Container, spec: LaunchSpec) -> bool:
        current = set(container.attrs.get("Config", {}).get("Env") or [])
        return all(f"{key}={value}" in current for key, value in spec.env.items())

    # -- contract ------------------------------------------------------------------------------
    def prepare(self, spec: LaunchSpec, state: State) -> State:
        self._ensure_volume(spec)
        container = self._find(spec.workspace_id)
        if container is not None:
            adoptable = (
                self._generation_of(container) == spec.generation
                and container.status == "created"
                and self._env_matches(container, spec)
            )
            if adoptable:
                return self._state(container, spec.generation)
            # An earlier (or killed) cycle's container: replaced, never a name conflict.
            self._remove_container(container)
        return self._state(self._create(spec), spec.generation)

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

    def _wait_running(self, container: Container, spec: LaunchSpec) -> State:
        deadline = time.monotonic() + settings.DOCKER_START_WAIT_SECONDS
        delay = 0.05
        while True:
            with engine_errors(f"inspecting container {spec.name}"):
                container.reload()
            status = container.status
            if status == "running":
                return {**self._state(container, spec.generation), "started_at": time.time()}
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

    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        container = self._find(workspace_id)
        if container is None:
            return InstanceStatus(exists=False, running=False, detail="no container")
        status = container.status
        exit_code = None
        detail = f"container {container.name} is {status}"
        if status in ("exited", "dead"):
            facts = container.attrs.get("State", {})
            exit_code = facts.get("ExitCode")
            detail = f"container {container.name} {_exit_reason(status, exit_code, facts)}"
        return InstanceStatus(
            exists=True, running=status in _ALIVE, exit_code=exit_code, detail=detail
        )

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
            if not workspace_id:
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


# -- the agent image -----------------------------------------------------------------------------
AGENT_DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
LABEL {label}=agent
ENTRYPOINT ["/bin/sh", "/agent.sh"]
"""
# Applets linked even when `busybox --list` is unavailable: what agent.sh and tests use.
_APPLETS: tuple[str, ...] = (
    "sh",
    "cat",
    "date",
    "echo",
    "env",
    "kill",
    "ls",
    "mkdir",
    "printf",
    "ps",
    "rm",
)
_APPLETS += ("sleep", "test", "timeout", "wget", "[", "[[", "true", "false")


def _applets(busybox: Path) -> list[str]:
    import subprocess

    try:
        listed = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    return sorted(set(listed) | set(_APPLETS))


def agent_image_context(busybox: Path | None = None) -> bytes:
    """The build context of the agent image: a Dockerfile, Debian's static busybox with a link
    per applet, and the agent script. No base image, so no registry is needed."""
    binary = Path(busybox or settings.DOCKER_AGENT_BUSYBOX)
    if not binary.is_file():
        raise BackendError(
            f"{binary} not found: install Debian's busybox-static (apt-get install busybox-static) "
            "or set DOCKER_AGENT_BUSYBOX"
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))

        def folder(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            archive.addfile(info)

        add("Dockerfile", AGENT_DOCKERFILE.format(label=_label("image")).encode())
        for name in ("rootfs", "rootfs/bin", "rootfs/workspace"):
            folder(name)
        folder("rootfs/tmp", 0o1777)
        add("rootfs/bin/busybox", binary.read_bytes(), 0o755)
        for applet in _applets(binary):
            if "/" in applet or applet == "busybox":
                continue
            link = tarfile.TarInfo(f"rootfs/bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            archive.addfile(link)
        add("rootfs/agent.sh", AGENT_SH.read_bytes(), 0o755)
    return buffer.getvalue()


def build_agent_image(tag: str | None = None, busybox: Path | None = None) -> str:
    """Build the default agent image on the configured engine; returns the image id."""
    tag = tag or settings.DOCKER_AGENT_IMAGE
    context = agent_image_context(busybox)
    with engine_errors("connecting"):
        client = make_client()
    with engine_errors(f"building image {tag}"):
        try:
            image, _ = client.images.build(
                fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True, forcerm=True
            )
        except docker.errors.BuildError as exc:
            log = "".join(
                str(line.get("stream") or line.get("error") or "") for line in exc.build_log
            )
            raise BackendError(f"docker: building image {tag} failed: {exc.msg}\n{log}") from exc
        finally:
            client.close()
    return str(image.id)
