"""The Docker backend: each workspace is a container ``ws-<id>`` on a Docker engine.

Modelled on JupyterHub's DockerSpawner: fixed names (container ``ws-<id>``, config volume
``ws-<id>-configs``), get-or-create, NotFound on remove means done. The engine client, the labels
every object carries and the mapping of engine failures are ``engine``'s (shared with the Swarm
backend); where a container sits on the network and what it may reach is ``docker_networks``'s
(``DOCKER_NETWORK_MODE``: a veth link of its own by default, an internal network per workspace,
or the host's network as the documented opt-out); how a container is made and its config volume
filled is ``docker_create``'s. This module is the contract on top of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import signal
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from uuid import UUID

import docker.errors
import requests.exceptions
from django.conf import settings
from docker.models.containers import Container

from provisioning.backends import docker_networks, follow
from provisioning.backends.agent_image import config_image_files, config_image_tag
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
    last_lines,
)
from provisioning.backends.docker_create import (
    ContainerMaker,
    NameTaken,
    config_archive,
    config_in_image,
)
from provisioning.backends.engine import (
    CLAIM_FILE,
    VOLUME_CLAIM_NAME,
    EngineBackend,
    claim_archive,
    claim_script,
    config_mount,
    container_name,
    engine_errors,
    generation_of,
    image_for,
    label,
    labelled,
    platform_filter,
    volume_name,
    workspace_user_ids,
    write_inside,
)
from workspaces.manifests import Template

_CREATE_ATTEMPTS = 3
# The label the engine puts on the container of a Swarm task.
_SWARM_TASK_LABEL = "com.docker.swarm.task.id"
# States in which the container's processes exist: paused is silent (the liveness window's
# business, like a SIGSTOPped process), not dead.
_ALIVE = frozenset({"running", "paused"})
_EXITED = re.compile(r"Exited \((-?\d+)\)")


class DockerBackend(EngineBackend):
    name = "docker"
    keeps_pools = True
    sandboxes = ("runc", "gvisor")
    # The Linux bridge (veth: the host end of the link) a workspace's interface is named, and
    # the check that the host firewall covers a workspace network's bridge.
    bridge_name = staticmethod(docker_networks.bridge_name)
    ensure_bridge_firewall = staticmethod(docker_networks.ensure_bridge_firewall)

    def __init__(self) -> None:
        super().__init__()
        self._maker = ContainerMaker()
        # Containers this process's prepare made or adopted, by id: the fingerprint of the env
        # they carry (in memory only, never saved). start() starts such a container by id with
        # no lookup when its spec carries the same env.
        self._prepared: dict[str, int] = {}

    def app_address(self, workspace_id: UUID, state: State, port: int) -> str:
        # With host networking the app listens on the host's loopback; a container on a network
        # of the platform's making is reached at the address recorded in its state.
        return f"{state.get('address') or settings.DOCKER_APP_HOST}:{port}"

    def check_available(self) -> None:
        reason = docker_networks.unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(self.name, reason)
        self.check_engine()

    def check_sandbox(self, sandbox: str) -> None:
        self._maker.check_runtime(self.client, sandbox)

    def config_in_image(self, spec: LaunchSpec) -> bool:
        return config_in_image(spec)

    # -- containers ------------------------------------------------------------------------------
    def _find(self, workspace_id: UUID | str) -> Container | None:
        with engine_errors(f"inspecting container {container_name(workspace_id)}"):
            try:
                return self.client.containers.get(container_name(workspace_id))
            except docker.errors.NotFound:
                return None

    def _remove_container(self, container: Container) -> None:
        with (
            engine_errors(f"removing container {container.name}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            container.remove(force=True)

    def _container_for(self, spec: LaunchSpec) -> Container:
        container = self._find(spec.workspace_id)
        if container is None:
            raise self._gone(spec)
        return container

    @staticmethod
    def _state(container: Container, generation: int) -> State:
        # Never the environment: it holds the agent token and the user's secrets.
        return {"container_id": container.id, "generation": generation}

    @staticmethod
    def _generation_of(container: Container) -> int | None:
        return generation_of(container.labels)

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
                created = self._maker.create(
                    self.client, spec, network_known=bool(state.get("network"))
                )
                return self._prepared_as(created, spec)
            except NameTaken:
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
        marker = posixpath.join(config_mount(spec), CONFIG_MARKER)
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
        mount = config_mount(spec)
        marker = json.dumps({"template": spec.template.name, "generation": spec.generation})
        payload = {name: data for name, data in files.items() if name != CONFIG_MARKER}
        # One archive, the marker its last entry: the engine extracts entries in order, so an
        # interrupted copy leaves no marker, reads as EMPTY and is redone. Each put_archive on a
        # created container mounts its file systems, the costliest engine call of a cycle.
        payload[CONFIG_MARKER] = marker.encode()
        with engine_errors(f"writing the config volume of {spec.name}"):
            try:
                accepted = self.client.api.put_archive(
                    spec.name, mount, config_archive(payload, time.time())
                )
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
                return {
                    **self._state(container, spec.generation),
                    **docker_networks.running_address(container, spec),
                    **({"claim_dir": self._volume_claim_dir(spec)} if spec.pooled else {}),
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

    @staticmethod
    def _tail(container: Container, lines: int = 5) -> str:
        try:
            output = container.logs(tail=lines).decode(errors="replace").strip()
        except (docker.errors.DockerException, requests.RequestException):
            return ""
        return f"; last output: {output}" if output else ""

    def launch_image_id(self, template: Template) -> str | None:
        """Read now, never from a cache: a base image rebuilt under its tag must be seen."""
        spec = LaunchSpec(UUID(int=0), 0, template, {})
        reference = image_for(spec)
        with engine_errors(f"inspecting image {reference}"):
            try:
                if config_in_image(spec):
                    base_id = str(self.client.api.inspect_image(reference)["Id"])
                    files = config_image_files(template.name, template.config_files())
                    reference = config_image_tag(base_id, template.name, files)
                return str(self.client.api.inspect_image(reference)["Id"])
            except docker.errors.NotFound:
                return ""

    def claim(self, spec: LaunchSpec, state: State) -> State:
        """The claim as a file the member's agent reads, then SIGUSR1 to the agent (the
        container's first process, which traps it).

        Where the worker runs on the engine's host (a local volume it can write: recorded as
        ``claim_dir`` when the member started), the file goes straight into the member's config
        volume, renamed into place, and only the signal crosses the engine: ``put_archive``
        mounts the container's file systems and was most of a hand-over's time. Otherwise it is
        put into the container's own /tmp after an inspect that the member still runs (under
        gVisor by a process inside: ``write_inside``). A member that cannot take it leaves no
        claim behind (the file is deleted)."""
        target = str(state.get("container_id") or spec.name)
        claim_dir = str(state.get("claim_dir") or "")
        if claim_dir and os.path.isdir(claim_dir):
            return self._claim_in_volume(spec, state, target, claim_dir)
        with engine_errors(f"handing pool member {spec.name} its claim"):
            try:
                facts = self.client.api.inspect_container(target)
                if not (facts.get("State") or {}).get("Running"):
                    raise BackendError(f"docker: pool member {spec.name} is not running")
                if spec.sandbox == "gvisor":  # the sandbox never sees a put_archive's file
                    write_inside(self.client, target, CLAIM_FILE, claim_script(spec.env))
                elif not self.client.api.put_archive(
                    target, posixpath.dirname(CLAIM_FILE), claim_archive(spec.env, time.time())
                ):
                    raise BackendError(f"docker: the engine refused the claim of {spec.name}")
                self.client.api.kill(target, signal="SIGUSR1")
            except docker.errors.NotFound as exc:
                raise self._gone(spec) from exc
        return {**state, "claimed_at": time.time()}

    def _claim_in_volume(
        self, spec: LaunchSpec, state: State, target: str, claim_dir: str
    ) -> State:
        path = os.path.join(claim_dir, VOLUME_CLAIM_NAME)
        partial = f"{path}.{os.getpid()}.tmp"
        uid, gid = workspace_user_ids()
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            os.fchown(handle.fileno(), uid, gid)
            handle.write(claim_script(spec.env))
        os.replace(partial, path)
        try:
            with engine_errors(f"waking pool member {spec.name}"):
                try:
                    self.client.api.kill(target, signal="SIGUSR1")
                except docker.errors.NotFound as exc:
                    raise self._gone(spec) from exc
        except BackendError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return {**state, "claimed_at": time.time()}

    def _volume_claim_dir(self, spec: LaunchSpec) -> str:
        """The member's config volume on this host, when the worker can write it (it runs on the
        engine's host as root, as veth links need); "" otherwise."""
        with engine_errors(f"inspecting volume {volume_name(spec.workspace_id)}"):
            try:
                found = self.client.api.inspect_volume(volume_name(spec.workspace_id))
            except docker.errors.NotFound:
                return ""
        mountpoint = str(found.get("Mountpoint") or "")
        usable = found.get("Driver") == "local" and os.path.isdir(mountpoint)
        return mountpoint if usable and os.access(mountpoint, os.W_OK) else ""

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
        name = volume_name(workspace_id)
        with (
            engine_errors(f"removing volume {name}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            self.client.volumes.get(name).remove(force=True)
        # After the container: a network with an endpoint attached cannot be removed.
        docker_networks.forget(self.client, workspace_id)

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
        name = container_name(workspace_id)

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
        mine = {"label": platform_filter()}
        with engine_errors("listing containers"):
            rows = self.client.api.containers(all=True, filters=mine)
        with engine_errors("listing volumes"):
            volumes = self.client.api.volumes(filters=mine).get("Volumes") or []
        found: dict[str, InstanceInfo] = {}
        for row in rows:
            labels = row.get("Labels") or {}
            workspace_id = labels.get(label("workspace-id"))
            # A Swarm task's container carries its service's labels: it is the Swarm backend's
            # (the same engine may be a manager), never a Docker orphan to remove.
            if not workspace_id or _SWARM_TASK_LABEL in labels:
                continue
            generation = labels.get(label("generation"), "")
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
                image=str(row.get("ImageID") or ""),
            )
            # Names are fixed (ws-<id>), so two containers for one id only exist when someone
            # made one by hand with our labels; a running one is the one that matters.
            if workspace_id not in found or info.running:
                found[workspace_id] = info
        for volume in volumes:
            workspace_id = (volume.get("Labels") or {}).get(label("workspace-id"))
            if workspace_id and workspace_id not in found:
                found[workspace_id] = InstanceInfo(
                    workspace_id=workspace_id, running=False, ref=f"volume {volume.get('Name')}"
                )
        # Networks left by an interrupted removal are orphans too (a third call, same reason).
        with engine_errors("listing networks"):
            networks = self.client.api.networks(filters=mine)
        for network in networks:
            workspace_id = (network.get("Labels") or {}).get(label("workspace-id"))
            if workspace_id and workspace_id not in found:
                found[workspace_id] = InstanceInfo(
                    workspace_id=workspace_id, running=False, ref=f"network {network.get('Name')}"
                )
        return list(found.values())

    def remove_orphan(self, instance: InstanceInfo) -> None:
        """Remove every container and volume of this platform labelled with the orphan's
        workspace id, whatever their names: an orphan made by hand need not be called ws-<id>,
        and a name alone could be another platform's object on a shared engine."""
        labels = labelled(instance.workspace_id)
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
        docker_networks.forget(self.client, instance.workspace_id)


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
