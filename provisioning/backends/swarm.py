"""The Swarm backend: each workspace is a replicated service ``ws-<id>`` on a Docker Swarm.

``SWARM_MANAGER_HOST`` (else ``DOCKER_HOST``) names a manager's engine; the engine client,
labels, image, resources and error mapping are the ones the Docker backend uses too
(``provisioning.backends.engine``). One service per workspace,
one replica, restart condition ``none`` (the platform's restart policy decides what runs again),
labelled like a Docker container (``<prefix>.platform``, ``.workspace-id``, ``.generation``) on
the service and on its tasks' containers, so one ``tasks`` call lists every instance.

What a cycle holds lives in the swarm's state, not on a node, so a workspace can run anywhere:
- the environment (agent token, user secrets) is a Swarm *secret* ``ws-<id>-env-g<generation>``,
  a file of ``export`` lines the entrypoint sources; ``docker service inspect`` shows its name,
  never its content;
- the template's config is a set of Swarm *configs*, one per file, mounted read-only under the
  config mount, written once per generation (``ws-<id>-g<generation>-<n>``) with a marker config
  last; a start mounts the newest complete set, so a set removed behind the platform's back reads
  as EMPTY and the lifecycle recovers it (``WORKSPACE_CONFIG_RECOVERED``).

Networking is the host's (``--network host``): overlay networks need a data path between nodes
that this deployment may not have (README "Docker Swarm"); ``DOCKER_NETWORK_MODE`` is the Docker
backend's. Tasks run as ``DOCKER_WORKSPACE_USER`` with every capability dropped and the Docker
backend's limits; Swarm on API 1.41 cannot set ``no-new-privileges``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from functools import partial
from typing import Any
from uuid import UUID

import docker.errors
from django.conf import settings
from docker.types import (
    ConfigReference,
    ContainerSpec,
    Placement,
    Resources,
    RestartPolicy,
    SecretReference,
    ServiceMode,
    TaskTemplate,
)

from provisioning.backends import follow, swarm_tasks
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
from provisioning.backends.engine import (
    EngineBackend,
    config_mount,
    container_name,
    engine_errors,
    engine_url,
    environment,
    generation_of,
    image_for,
    label,
    labelled,
    labels,
    limits,
    platform_filter,
    safe_relative,
    workspace_user_ids,
)

ENV_FILE = "/run/secrets/workspace-env"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# How long tasks that have all ended may stay before the orchestrator is asked to reconcile again.
_REAP_NUDGE_SECONDS = 3.0
_SIZE = re.compile(r"^(\d+)([bkmg]?)$")


def _bytes(size: str) -> int:
    match = _SIZE.match(size.lower())
    if not match:
        raise BackendError(f"swarm: memory size {size!r} is not like '512m'")
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def env_file(env: Mapping[str, str]) -> bytes:
    """The environment as lines a POSIX shell sources (``export NAME='value'``)."""
    lines = []
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise BackendError(f"swarm: environment name {key!r} is not a shell name")
        lines.append(f"export {key}={_quote(value)}\n")
    return "".join(lines).encode()


class SwarmBackend(EngineBackend):
    """The engine client, names, labels, limits and image defaults are ``engine``'s."""

    name = "swarm"

    def engine_host(self) -> str:
        return str(settings.SWARM_MANAGER_HOST or settings.DOCKER_HOST)

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return engine_errors(f"swarm: {doing}", self.engine_host())

    def check_available(self) -> None:
        self.check_engine()
        try:
            with self._errors("asking for the swarm state"):
                swarm = self.client.info().get("Swarm") or {}
        except BackendError as exc:
            raise BackendUnavailable(self.name, str(exc)) from exc
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise BackendUnavailable(
                self.name,
                f"the engine at {engine_url(self.engine_host())} is not a swarm manager "
                f"(node state {swarm.get('LocalNodeState') or 'unknown'!r}): run `docker swarm "
                "init` there or point SWARM_MANAGER_HOST at a manager",
            )

    def app_address(self, workspace_id: UUID, state: State, port: int) -> str:
        return f"{settings.DOCKER_APP_HOST}:{port}"

    # -- names ---------------------------------------------------------------------------------
    @staticmethod
    def secret_name(workspace_id: UUID | str, generation: int) -> str:
        return f"{container_name(workspace_id)}-env-g{generation}"

    @staticmethod
    def config_name(workspace_id: UUID | str, generation: int, index: int) -> str:
        return f"{container_name(workspace_id)}-g{generation}-{index}"

    # -- engine objects ------------------------------------------------------------------------
    def _service(self, workspace_id: UUID | str) -> dict[str, Any] | None:
        return self._service_by_id(container_name(workspace_id))

    def _service_by_id(self, ref: str) -> dict[str, Any] | None:
        """The service whose name or id is ``ref``; None when there is none."""
        with self._errors(f"inspecting service {ref}"):
            try:
                return dict(self.client.api.inspect_service(ref))
            except docker.errors.NotFound:
                return None

    def _tasks(self, workspace_id: UUID | str) -> list[dict[str, Any]]:
        with self._errors(f"listing the tasks of {container_name(workspace_id)}"):
            return list(self.client.api.tasks(filters=labelled(workspace_id)))

    def _nodes(self) -> dict[str, dict[str, Any]]:
        with self._errors("listing the swarm's nodes"):
            return {node["ID"]: node for node in self.client.api.nodes()}

    def _remove_service(self, workspace_id: UUID | str) -> None:
        name = container_name(workspace_id)
        with self._errors(f"removing service {name}"), contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_service(name)

    def _remove_objects(self, kind: str, workspace_id: UUID | str, keep: str = "") -> None:
        """Remove this platform's configs or secrets of the workspace (but ``keep``). One in use
        by a service being removed is retried for a while, then left for the next removal."""
        api = self.client.api
        lister, remover = (
            (api.configs, api.remove_config)
            if kind == "config"
            else (api.secrets, api.remove_secret)
        )
        with self._errors(f"listing the {kind}s of {workspace_id}"):
            found = lister(filters=labelled(workspace_id))
        deadline = time.monotonic() + 15
        for item in found:
            name = item["Spec"]["Name"]
            if name == keep:
                continue
            while True:
                try:
                    with (
                        self._errors(f"removing {kind} {name}"),
                        contextlib.suppress(docker.errors.NotFound),
                    ):
                        remover(item["ID"])
                    break
                except BackendError:
                    if keep or time.monotonic() > deadline:
                        break  # in use by a live service: the next removal takes it
                    time.sleep(0.5)

    def _wait_tasks_gone(self, workspace_id: UUID | str, seconds: float) -> None:
        """Until the swarm has reaped every task of the workspace's service (scaled to 0, each
        ends with SIGTERM, then SIGKILL after the grace period, and is then deleted). Waiting
        for the deletion, not only the end, matters: dockerd 20.10 panics when a service is
        removed while the task reaper deletes one of its tasks (swarmkit's
        ``SetServiceTasksRemove`` reads a task that is gone). A task on a node that is down is
        not waited for: its node stops it when it comes back (its desired state is no longer
        running)."""
        deadline = time.monotonic() + seconds
        nudge_at = time.monotonic() + _REAP_NUDGE_SECONDS
        while True:
            tasks = self._tasks(workspace_id)
            if not tasks:
                return
            nodes = self._nodes()
            if all(
                t.get("NodeID") in nodes and swarm_tasks.node_down(nodes[t["NodeID"]])
                for t in tasks
            ):
                return
            if time.monotonic() > deadline:
                states = sorted(
                    {
                        f"{(t.get('Status') or {}).get('State', '?')}"
                        f" (desired {t.get('DesiredState', '?')})"
                        for t in tasks
                    }
                )
                raise BackendError(
                    f"swarm: the tasks of {container_name(workspace_id)} are still there "
                    f"({', '.join(states)}) after {seconds:.0f} s"
                )
            if time.monotonic() > nudge_at and all(swarm_tasks.ended(t) for t in tasks):
                # Every task has ended and none will run again, yet the swarm keeps them: the
                # orchestrator deletes such tasks when it reconciles the service, which a
                # service update makes it do; scaling to 0 again is that update.
                nudge_at = time.monotonic() + _REAP_NUDGE_SECONDS
                self._scale(workspace_id, 0)
            time.sleep(0.3)

    def _marked_generations(self, workspace_id: UUID | str) -> dict[int, list[dict[str, Any]]]:
        """Config sets by generation, complete ones only (those holding the marker)."""
        with self._errors(f"listing the configs of {workspace_id}"):
            configs = self.client.api.configs(filters=labelled(workspace_id))
        sets: dict[int, list[dict[str, Any]]] = {}
        for config in configs:
            generation = generation_of(config["Spec"].get("Labels"))
            if generation is not None:
                sets.setdefault(generation, []).append(config)
        return {
            generation: items
            for generation, items in sets.items()
            if any(
                (c["Spec"].get("Labels") or {}).get(label("path")) == CONFIG_MARKER for c in items
            )
        }

    # -- contract ------------------------------------------------------------------------------
    def prepare(self, spec: LaunchSpec, state: State) -> State:
        # A service of an earlier (or killed) cycle is replaced, never duplicated; its secret
        # holds an older token. The secret is created here, once per cycle.
        if self._service(spec.workspace_id) is not None:
            self.stop(spec.workspace_id, state, settings.STOP_GRACE_SECONDS)
            self._remove_service(spec.workspace_id)
        self._remove_objects("secret", spec.workspace_id)
        name = self.secret_name(spec.workspace_id, spec.generation)
        env = environment(spec, host_net=True)  # tasks use host networking
        with self._errors(f"creating secret {name}"):
            created = self.client.api.create_secret(
                name, env_file(env), labels=labels(spec.workspace_id, spec.generation)
            )
        return {"secret_id": created["ID"], "generation": spec.generation}

    def config_state(self, spec: LaunchSpec, state: State) -> ConfigState:
        if self._marked_generations(spec.workspace_id):
            return ConfigState.PROVISIONED
        return ConfigState.EMPTY

    def write_config(self, spec: LaunchSpec, state: State, files: Mapping[str, bytes]) -> None:
        # Configs are immutable: a set of this generation left by an interrupted attempt is
        # replaced whole; the marker comes last, so a set without it is never mounted.
        self._remove_configs_of(spec.workspace_id, spec.generation)
        payload = [(safe_relative(path), data) for path, data in files.items()]
        payload = [(path, data) for path, data in payload if path != CONFIG_MARKER]
        payload.append((CONFIG_MARKER, f'{{"template": "{spec.template.name}"}}'.encode()))
        for index, (path, data) in enumerate(payload):
            name = self.config_name(spec.workspace_id, spec.generation, index)
            marks = {**labels(spec.workspace_id, spec.generation), label("path"): path}
            with self._errors(f"creating config {name} ({path})"):
                self.client.api.create_config(name, data, labels=marks)

    def _remove_configs_of(self, workspace_id: UUID | str, generation: int) -> None:
        with self._errors(f"listing the configs of {workspace_id}"):
            configs = self.client.api.configs(filters=labelled(workspace_id))
        self._remove_configs(
            config
            for config in configs
            if (config["Spec"].get("Labels") or {}).get(label("generation")) == str(generation)
        )

    def _remove_configs(self, configs: Iterable[dict[str, Any]]) -> None:
        for config in configs:
            with (
                self._errors(f"removing config {config['Spec']['Name']}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.client.api.remove_config(config["ID"])

    def _container_spec(self, spec: LaunchSpec, state: State) -> ContainerSpec:
        uid, gid = workspace_user_ids()
        mount = config_mount(spec).rstrip("/")
        sets = self._marked_generations(spec.workspace_id)
        if not sets:
            raise BackendError(f"swarm: no config set for {spec.name}; the next cycle writes it")
        configs = [
            ConfigReference(
                config["ID"],
                config["Spec"]["Name"],
                filename=f"{mount}/{(config['Spec'].get('Labels') or {})[label('path')]}",
                uid=str(uid),
                gid=str(gid),
                mode=0o444,
            )
            for config in sets[max(sets)]
        ]
        secret = SecretReference(
            state["secret_id"],
            self.secret_name(spec.workspace_id, spec.generation),
            filename=ENV_FILE.rsplit("/", 1)[1],
            uid=str(uid),
            gid=str(gid),
            mode=0o400,
        )
        # The image's entrypoint (or the template's command) runs after the shell sources the
        # environment file: the token never appears in the service's spec.
        command = list(spec.template.command or self._image_entrypoint(spec))
        return ContainerSpec(
            image_for(spec),
            command=["/bin/sh", "-c", f'set -a; . {ENV_FILE}; set +a; exec "$@"', "sh"],
            args=command,
            user=settings.DOCKER_WORKSPACE_USER,
            labels={
                **labels(spec.workspace_id, spec.generation),
                label("template"): spec.template.name,
            },
            configs=configs,
            secrets=[secret],
            stop_grace_period=int(settings.STOP_GRACE_SECONDS * 1e9),
            stop_signal="SIGTERM",
            cap_drop=["ALL"],
        )

    def _image_entrypoint(self, spec: LaunchSpec) -> list[str]:
        with self._errors(f"inspecting image {image_for(spec)}"):
            config = self.client.api.inspect_image(image_for(spec)).get("Config") or {}
        return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]

    def _task_resources(self, spec: LaunchSpec) -> Resources:
        found = limits(spec)
        resources = Resources(cpu_limit=found["nano_cpus"], mem_limit=_bytes(found["mem_limit"]))
        resources["Limits"]["Pids"] = found["pids_limit"]
        return resources

    def start(self, spec: LaunchSpec, state: State) -> State:
        service = self._service(spec.workspace_id)
        current = (service or {}).get("Spec", {}).get("Labels") or {}
        if service is not None and current.get(label("generation")) != str(spec.generation):
            state = self.prepare(spec, state)
            service = None
        if "secret_id" not in state:
            state = self.prepare(spec, state)
        if service is None:
            template = TaskTemplate(
                self._container_spec(spec, state),
                resources=self._task_resources(spec),
                restart_policy=RestartPolicy(condition="none"),
                placement=Placement(constraints=list(spec.template.placement)),
                networks=["host"],
            )
            with self._errors(f"creating service {spec.name} from {image_for(spec)}"):
                self.client.api.create_service(
                    template,
                    name=spec.name,
                    labels={
                        **labels(spec.workspace_id, spec.generation),
                        label("template"): spec.template.name,
                    },
                    mode=ServiceMode("replicated", replicas=1),
                )
        else:
            self._scale(spec.workspace_id, 1)
        state = self._wait_task_running(spec, state)
        # Older config sets are no longer mounted by anything of this workspace (one listing;
        # each set holds every config of its generation).
        sets = self._marked_generations(spec.workspace_id)
        for generation, configs in sets.items():
            if generation != max(sets):
                self._remove_configs(configs)
        return state

    def _scale(self, workspace_id: UUID | str, replicas: int) -> None:
        name = container_name(workspace_id)
        self._scale_service(name, lambda: self._service(workspace_id), replicas)

    def _scale_service(
        self, name: str, read: Callable[[], dict[str, Any] | None], replicas: int
    ) -> None:
        """Scale the service ``read`` returns (read again after a stale version) to
        ``replicas``; nothing when it is gone."""
        for _attempt in range(5):
            service = read()
            if service is None:
                return
            with self._errors(f"scaling service {name} to {replicas}"):
                try:
                    self.client.api.update_service(
                        service["ID"],
                        service["Version"]["Index"],
                        mode=ServiceMode("replicated", replicas=replicas),
                        fetch_current_spec=True,
                    )
                    return
                except docker.errors.APIError as exc:
                    # A stale version ("update out of sequence"): read it again and retry.
                    if "out of sequence" not in str(exc):
                        raise
        raise BackendError(f"swarm: could not scale service {name}: updated concurrently")

    def _wait_task_running(self, spec: LaunchSpec, state: State) -> State:
        deadline = time.monotonic() + settings.DOCKER_START_WAIT_SECONDS
        while True:
            task = swarm_tasks.current(self._tasks(spec.workspace_id), spec.generation)
            status = (task or {}).get("Status") or {}
            if status.get("State") == "running":
                return {
                    **state,
                    "service": spec.name,
                    "task_id": task["ID"] if task else "",
                    "node_id": (task or {}).get("NodeID", ""),
                    "network": "host",
                    "started_at": time.time(),
                }
            if task is not None and status.get("State") in swarm_tasks.FAILED:
                raise BackendError(
                    f"swarm: the task of {spec.name} ended at once: "
                    f"{swarm_tasks.describe(task, {})}{self._last_output(spec.workspace_id)}"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"swarm: the task of {spec.name} is {status.get('State') or 'not scheduled'!r}"
                    f" ({status.get('Err') or status.get('Message') or 'no message'}), not running,"
                    f" after {settings.DOCKER_START_WAIT_SECONDS} s"
                )
            time.sleep(0.3)

    def _last_output(self, workspace_id: UUID | str) -> str:
        try:
            output = self.logs(UUID(str(workspace_id)), {}, 5, 2000).strip()
        except BackendError:
            return ""
        return f"; last output: {output}" if output else ""

    def stop(self, workspace_id: UUID, state: State, grace_seconds: float) -> State:
        service = self._service(workspace_id)
        if service is None:
            return {}
        self._scale(workspace_id, 0)
        # The task ends with SIGTERM, then SIGKILL after the service's stop grace period.
        self._wait_tasks_gone(workspace_id, grace_seconds + settings.DOCKER_START_WAIT_SECONDS)
        return {
            "service": container_name(workspace_id),
            "generation": generation_of(service.get("Spec", {}).get("Labels")),
        }

    def remove(self, workspace_id: UUID, state: State) -> None:
        # Scaled down and its tasks reaped first: see _wait_tasks_gone.
        self.stop(workspace_id, state, settings.STOP_GRACE_SECONDS)
        self._remove_service(workspace_id)
        # Configs and secrets cannot be removed while a service refers to them.
        self._remove_objects("secret", workspace_id)
        self._remove_objects("config", workspace_id)

    def remove_orphan(self, instance: InstanceInfo) -> None:
        with self._errors(f"listing the services of orphan {instance.workspace_id}"):
            services = self.client.api.services(filters=labelled(instance.workspace_id))
        # As remove: every service scaled down and its tasks reaped before it goes
        # (_wait_tasks_gone says why); a pass that times out raises, and the next one retries.
        for service in services:
            self._scale_service(
                service["Spec"]["Name"], partial(self._service_by_id, service["ID"]), 0
            )
        if services:
            self._wait_tasks_gone(
                instance.workspace_id,
                settings.STOP_GRACE_SECONDS + settings.DOCKER_START_WAIT_SECONDS,
            )
        for service in services:
            with (
                self._errors(f"removing orphan service {service['Spec']['Name']}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                self.client.api.remove_service(service["ID"])
        self._remove_objects("secret", instance.workspace_id)
        self._remove_objects("config", instance.workspace_id)

    def status(self, workspace_id: UUID, state: State) -> InstanceStatus:
        service = self._service(workspace_id)
        name = container_name(workspace_id)
        if service is None:
            return InstanceStatus(exists=False, running=False, detail="no service")
        task = swarm_tasks.current(self._tasks(workspace_id))
        if task is None:
            return InstanceStatus(exists=True, running=False, detail=f"service {name} has no task")
        nodes = self._nodes()
        running = swarm_tasks.running(task, nodes)
        return InstanceStatus(
            exists=True,
            running=running,
            exit_code=None if running else swarm_tasks.exit_code(task),
            detail=f"service {name}: task {swarm_tasks.describe(task, nodes)}",
        )

    def logs(self, workspace_id: UUID, state: State, tail: int, max_bytes: int) -> str:
        if tail <= 0 or self._service(workspace_id) is None:
            return ""
        name = container_name(workspace_id)
        with self._errors(f"reading the logs of {name}"):
            try:
                chunks = self.client.api.service_logs(
                    name, stdout=True, stderr=True, tail=str(tail)
                )
                data = b"".join(chunks)
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
            service = self._service(workspace_id)
            if service is None:
                return follow.Seen(None, False, "no service")
            task = swarm_tasks.current(self._tasks(workspace_id))
            if task is None:
                return follow.Seen((service["ID"], None), False, f"service {name} has no task")
            nodes = self._nodes()
            detail = f"service {name}: task {swarm_tasks.describe(task, nodes)}"
            # Swarm replaces a task that dies with a new one: a new task id is a new instance.
            return follow.Seen(
                (service["ID"], task["ID"]), swarm_tasks.running(task, nodes), detail
            )

        # The service's log stream carries every task's output, the replacements' included.
        return follow.follow_engine(
            self.engine_host(),
            look,
            lambda count, since: follow.log_path("services", name, tail=count, since=since),
            tail=tail,
            max_bytes=max_bytes,
            max_line_bytes=max_line_bytes,
            poll_seconds=poll_seconds,
        )

    def list_instances(self) -> list[InstanceInfo]:
        # Two engine calls whatever the number of workspaces: every task of this platform (the
        # container labels are on each task's spec) and the nodes, whose state is the truth
        # about tasks on a node that went away.
        with self._errors("listing tasks"):
            tasks = self.client.api.tasks(filters={"label": platform_filter()})
        nodes = self._nodes()
        by_workspace: dict[str, list[dict[str, Any]]] = {}
        for task in tasks:
            workspace_id = swarm_tasks.container_labels(task).get(label("workspace-id"))
            if workspace_id:
                by_workspace.setdefault(workspace_id, []).append(task)
        found = []
        for workspace_id, items in by_workspace.items():
            task = swarm_tasks.current(items)
            assert task is not None
            running = swarm_tasks.running(task, nodes)
            found.append(
                InstanceInfo(
                    workspace_id=workspace_id,
                    running=running,
                    generation=generation_of(swarm_tasks.container_labels(task)),
                    ref=str(task.get("ServiceID", "")),
                    exit_code=None if running else swarm_tasks.exit_code(task),
                )
            )
        return found
