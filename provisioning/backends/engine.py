"""The Docker engine as the Docker and Swarm backends both reach it: the client, the labels that
mark the platform's objects, the mapping of engine failures to backend errors, and what a
workspace's instance is made of whichever of the two runs it (names, image, limits, environment).

Every object either backend makes carries ``<prefix>.platform=<PLATFORM_ID>``,
``<prefix>.workspace-id`` and ``<prefix>.generation`` labels, so a backend finds its instances
without any saved state (a killed worker may have created one whose state was never saved) and
never touches another platform's objects.

The engine is reached with ``DOCKER_HOST`` (unix or tcp; the Swarm backend: its manager) and no
registry: images are built locally (``manage.py build_agent_image``) and never pulled.
``EngineBackend`` is what the two backends share of the contract: the client of the engine that
``engine_host`` names, made once and on first use, and the reachability check.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import re
import socket
import tarfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any
from uuid import UUID

import docker
import docker.errors
import requests.exceptions
from django.conf import settings

from provisioning.backends.base import (
    BackendError,
    BackendUnavailable,
    LaunchSpec,
    TransientBackendError,
    WorkspaceBackend,
)

# Engine errors in the 5xx range that retrying cannot fix (a bad image command, a bad mount).
_PERMANENT_SERVER_ERRORS = re.compile(
    r"OCI runtime|executable file not found|no such file or directory|invalid mount|"
    r"invalid reference format|not a directory",
    re.IGNORECASE,
)


# -- labels ------------------------------------------------------------------------------------
def label(key: str) -> str:
    """The platform's label ``key`` (``DOCKER_LABEL_PREFIX.key``)."""
    return f"{settings.DOCKER_LABEL_PREFIX}.{key}"


def labels(workspace_id: UUID | str, generation: int | None = None) -> dict[str, str]:
    """The labels of an object made for ``workspace_id`` (and for a cycle's ``generation``)."""
    found = {
        label("platform"): settings.PLATFORM_ID,
        label("workspace-id"): str(workspace_id),
    }
    if generation is not None:
        found[label("generation")] = str(generation)
    return found


def generation_of(object_labels: dict[str, str] | None) -> int | None:
    """The cycle an object's labels name; None when it carries none (made by hand)."""
    value = (object_labels or {}).get(label("generation"), "")
    return int(value) if value.isdigit() else None


def platform_filter() -> str:
    """The label filter that selects this platform's containers and volumes."""
    return f"{label('platform')}={settings.PLATFORM_ID}"


def workspace_filter(workspace_id: UUID | str) -> str:
    return f"{label('workspace-id')}={workspace_id}"


def labelled(workspace_id: UUID | str) -> dict[str, Any]:
    """The engine listing filter for this platform's objects of ``workspace_id``."""
    return {"label": [platform_filter(), workspace_filter(workspace_id)]}


# -- names and what an instance is made of -------------------------------------------------------
def container_name(workspace_id: UUID | str) -> str:
    """``ws-<id>``: the Docker container, the Swarm service, and the prefix of their objects."""
    return f"ws-{workspace_id}"


def volume_name(workspace_id: UUID | str) -> str:
    return f"{container_name(workspace_id)}-configs"


def image_for(spec: LaunchSpec) -> str:
    return spec.template.image or settings.DOCKER_AGENT_IMAGE


def config_mount(spec: LaunchSpec) -> str:
    return spec.template.config_mount or settings.DOCKER_CONFIG_MOUNT


def limits(spec: LaunchSpec) -> dict[str, Any]:
    """The manifest's ``resources`` (or the ``DOCKER_DEFAULT_*`` limits) as the engine's
    host config names them."""
    resources = spec.template.resources
    cpus = resources.cpus or settings.DOCKER_DEFAULT_CPUS
    return {
        "mem_limit": resources.memory or settings.DOCKER_DEFAULT_MEMORY,
        "nano_cpus": int(cpus * 1e9),
        "pids_limit": resources.pids or settings.DOCKER_DEFAULT_PIDS,
    }


def environment(spec: LaunchSpec, *, host_net: bool) -> dict[str, str]:
    """The instance's environment: the spec's, where its config is mounted, and where its app
    listens. On the host's network the app must listen on loopback only, or it would be
    reachable around the proxy; an instance with an address of its own is reached there."""
    found = {**spec.env, "WORKSPACE_CONFIG_DIR": config_mount(spec)}
    if spec.pooled:
        found["WORKSPACE_CLAIM_FILE"] = CLAIM_FILE
    if "WORKSPACE_APP_PORT" in spec.env:
        found["WORKSPACE_APP_HOST"] = "127.0.0.1" if host_net else "0.0.0.0"
    return found


# Where a warm pool member's claim is written: the container's own /tmp (its writable layer, gone
# with the container), never the config volume, which outlives a member that could not take it.
CLAIM_FILE = "/tmp/.workspace-claim"
# Or, where the worker can write the member's config volume on the engine's host, this file in
# it (the agent looks in both; the worker deletes it when the member cannot take it).
VOLUME_CLAIM_NAME = ".workspace-claim"
# Names whose values the member's container was given for its own network (PLATFORM_URL is its
# gateway's): a claim never overrides them with the platform-wide value.
CLAIM_KEEPS = frozenset({"PLATFORM_URL", "WORKSPACE_CONFIG_DIR", "WORKSPACE_APP_HOST"})


def claim_script(env: Mapping[str, str]) -> bytes:
    """The claim as the busybox agent reads it: ``export NAME='value'`` lines (names are checked
    identifiers; a value's single quotes are closed, escaped and reopened), then the line that
    says the file is complete."""
    lines = [
        f"export {name}='" + value.replace("'", "'\\''") + "'"
        for name, value in env.items()
        if name not in CLAIM_KEEPS
    ]
    return ("\n".join([*lines, "claim_complete=1", ""])).encode()


def claim_archive(env: Mapping[str, str], mtime: float) -> bytes:
    """The claim as a tar for ``put_archive`` into /tmp: owned by the workspace user, 0600."""
    content = claim_script(env)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(posixpath.basename(CLAIM_FILE))
        info.size, info.mode, info.mtime = len(content), 0o600, int(mtime)
        info.uid, info.gid = workspace_user_ids()
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def write_inside(client: docker.DockerClient, container: str, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` in the running container by a process of its own (``cat``, the
    data on its stdin, never in its argv; renamed into place, 0600, as the container's user).
    For a gVisor sandbox: its kernel keeps the root file system to itself, so a file the engine
    puts there from outside (``put_archive``) is never seen inside."""
    script = 'umask 077; cat > "$0.tmp" && mv "$0.tmp" "$0"'
    exec_id = client.api.exec_create(container, ["sh", "-c", script, path], stdin=True)["Id"]
    stream = client.api.exec_start(exec_id, socket=True)
    # The SDK hands back a file object over the engine's connection; the socket is under it.
    sock: Any = getattr(stream, "_sock", stream)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # what it says, until it ends
            pass
    finally:
        sock.close()
    code = client.api.exec_inspect(exec_id).get("ExitCode")
    if code != 0:
        raise BackendError(f"docker: writing {path} in {container} exited with {code}")


def safe_relative(path: str) -> str:
    """A template file's path inside the config folder; ``BackendError`` when it escapes it."""
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


# -- the client and its errors -------------------------------------------------------------------
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


def root_cause(exc: BaseException) -> str:
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
            f"docker: {doing}: cannot reach the engine at {engine_url(host)}: {root_cause(exc)}"
        ) from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"docker: {doing}: {root_cause(exc)}") from exc


class EngineBackend(WorkspaceBackend):
    """What the Docker and Swarm backends share: one client, made on first use, of the engine
    ``engine_host`` names (the hook a backend overrides), and the check that it answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: docker.DockerClient | None = None

    def engine_host(self) -> str:
        """The engine this backend talks to (default DOCKER_HOST)."""
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
                        f"docker: cannot reach the engine at {engine_url(host)}: {root_cause(exc)}"
                    ) from exc
            return self._client

    def check_engine(self) -> None:
        """Return if the engine answers; raise ``BackendUnavailable`` naming it otherwise."""
        try:
            self.client.ping()
        except (BackendError, docker.errors.DockerException, requests.RequestException) as exc:
            cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ else exc
            raise BackendUnavailable(
                self.name,
                f"cannot reach the Docker engine at {engine_url(self.engine_host())}: "
                f"{root_cause(cause)}",
            ) from exc
