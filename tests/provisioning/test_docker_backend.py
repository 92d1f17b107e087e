"""The Docker backend against a real engine: names, labels, volume, idempotency, errors, image.

No mocked client: every call goes to the dockerd at DOCKER_HOST (see the ``docker_engine``
fixture). Workspaces here are only ids; the e2e tests drive the backend through workers.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends import FACTORIES
from provisioning.backends.base import (
    CONFIG_COPIED,
    CONFIG_MARKER,
    BackendError,
    BackendUnavailable,
    ConfigState,
    LaunchSpec,
    TransientBackendError,
)
from provisioning.backends.docker import DockerBackend
from provisioning.backends.engine import label as _label
from tests.conftest import require_gvisor
from tests.support import next_backend_uid, wait_for
from workspaces.manifests import Template, templates

pytestmark = pytest.mark.docker


@pytest.fixture
def backend(docker_engine: Any) -> DockerBackend:
    backend = FACTORIES["docker"]()
    assert isinstance(backend, DockerBackend)
    return backend


def _spec(
    workspace_id: uuid.UUID, generation: int, *, sandbox: str = "runc", **env: str
) -> LaunchSpec:
    template = templates().get("shell-default")
    assert template is not None
    return LaunchSpec(
        workspace_id,
        generation,
        template,
        {
            "WORKSPACE_ID": str(workspace_id),
            "WORKSPACE_TOKEN": f"secret-token-{generation}",
            # Nothing listens there: the agent keeps retrying registration, which is all a
            # backend test needs (a running container).
            "PLATFORM_URL": "http://127.0.0.1:9",
            **env,
        },
        # DOCKER_NETWORK_MODE=veth numbers the workspace's link by its uid.
        uid=next_backend_uid(),
        sandbox=sandbox,
    )


def _containers(engine: Any, workspace_id: uuid.UUID) -> list[Any]:
    return engine.containers.list(
        all=True, filters={"label": f"{_label('workspace-id')}={workspace_id}"}
    )


def _read(engine: Any, name: str, path: str) -> str:
    result = engine.containers.get(name).exec_run(["cat", path])
    assert result.exit_code == 0, result.output
    return str(result.output.decode())


@pytest.mark.parametrize("network_mode", ["veth", "workspace"])
def test_full_round_trip_names_labels_volume_env(
    backend: DockerBackend, docker_engine, settings, network_mode: str
) -> None:
    settings.DOCKER_NETWORK_MODE = network_mode
    # The platform writes the config (the image delivery has its own test below).
    settings.DOCKER_CONFIG_DELIVERY = "archive"
    workspace_id = uuid.uuid4()
    spec = _spec(workspace_id, 1, GREETING="hi")
    name = f"ws-{workspace_id}"

    state = backend.prepare(spec, {})
    assert "WORKSPACE_TOKEN" not in str(state) and "secret-token" not in str(state)
    container = docker_engine.containers.get(name)
    assert container.status == "created"
    labels = container.labels
    assert labels[_label("workspace-id")] == str(workspace_id)
    assert labels[_label("generation")] == "1"
    assert labels[_label("platform")] == settings.PLATFORM_ID
    volume = docker_engine.volumes.get(f"{name}-configs")
    assert volume.attrs["Labels"][_label("workspace-id")] == str(workspace_id)
    # Its own link (veth: networking disabled until the worker wires it) or its own internal
    # network; non-root, no capabilities, no privilege gains, limits applied.
    host_config = container.attrs["HostConfig"]
    veth = network_mode == "veth"
    if veth:
        assert host_config["NetworkMode"] == "none"
        assert container.attrs["Config"].get("NetworkDisabled") is True
        assert docker_engine.networks.list(names=[f"{name}-net"]) == []
    else:
        assert host_config["NetworkMode"] == f"{name}-net"
        network = docker_engine.networks.get(f"{name}-net")
        assert network.attrs["Internal"] is True
        assert network.attrs["Labels"][_label("workspace-id")] == str(workspace_id)
    assert container.attrs["Config"]["User"] == settings.DOCKER_WORKSPACE_USER
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["SecurityOpt"] == ["no-new-privileges:true"]
    assert host_config["Memory"] == 512 * 1024 * 1024
    assert host_config["NanoCpus"] == 1_000_000_000
    assert host_config["PidsLimit"] == settings.DOCKER_DEFAULT_PIDS
    assert container.image.tags == [settings.DOCKER_AGENT_IMAGE]

    assert backend.config_state(spec, state) is ConfigState.EMPTY
    backend.write_config(spec, state, {"profile.sh": b"echo hi\n", "nested/dir/a.txt": b"a"})
    assert backend.config_state(spec, state) is ConfigState.PROVISIONED

    state = backend.start(spec, state)
    assert "secret-token" not in str(state)
    # Where the reverse proxy reaches the container: its address on its own link or network.
    if veth:
        host_end = backend.bridge_name(workspace_id)
        offset = spec.uid - settings.WORKSPACE_UID_RANGE[0]
        gateway = ipaddress.IPv4Network(settings.DOCKER_VETH_SUBNET).network_address + 2 * offset
        assert state["network"] == host_end
        assert state["address"] == str(gateway + 1)
        # The kernel publishes a link's operstate asynchronously (linkwatch), a moment after both
        # ends are up: the link must be up, within seconds of the start.
        operstate = Path("/sys/class/net") / host_end / "operstate"
        wait_for(lambda: operstate.read_text().strip() == "up", timeout=5, message="link up")
        # The container sees eth0 with the odd address and reaches the platform at the even one.
        inside = _read(docker_engine, name, "/proc/net/fib_trie")
        assert str(gateway + 1) in inside
        environ = _read(docker_engine, name, "/proc/1/environ").split("\0")
        assert f"PLATFORM_URL=http://{gateway}:9" in environ
    else:
        network.reload()
        [endpoint] = network.attrs["Containers"].values()
        assert state["network"] == f"{name}-net"
        assert state["address"] == endpoint["IPv4Address"].split("/")[0]
    status = backend.status(workspace_id, state)
    assert status.exists and status.running
    mount = settings.DOCKER_CONFIG_MOUNT
    assert _read(docker_engine, name, f"{mount}/profile.sh") == "echo hi\n"
    assert _read(docker_engine, name, f"{mount}/nested/dir/a.txt") == "a"
    assert '"template": "shell-default"' in _read(docker_engine, name, f"{mount}/{CONFIG_MARKER}")
    environ = _read(docker_engine, name, "/proc/1/environ").split("\0")
    assert "GREETING=hi" in environ
    assert "WORKSPACE_TOKEN=secret-token-1" in environ
    assert f"WORKSPACE_CONFIG_DIR={mount}" in environ

    listed = {info.workspace_id: info for info in backend.list_instances()}
    assert listed[str(workspace_id)].running is True
    assert listed[str(workspace_id)].generation == 1

    # The agent handles SIGTERM: it exits 0 well before the grace period would force a SIGKILL.
    state = backend.stop(workspace_id, state, grace_seconds=30)
    status = backend.status(workspace_id, state)
    assert (status.exists, status.running, status.exit_code) == (True, False, 0)
    assert backend.stop(workspace_id, state, grace_seconds=1) == state  # stopping twice: no-op

    backend.remove(workspace_id, state)
    assert _containers(docker_engine, workspace_id) == []
    assert docker_engine.volumes.list(filters={"name": f"{name}-configs"}) == []
    assert docker_engine.networks.list(names=[f"{name}-net"]) == []
    assert not (Path("/sys/class/net") / backend.bridge_name(workspace_id)).exists()
    backend.remove(workspace_id, state)  # not found means done
    assert backend.status(workspace_id, {}).exists is False


def test_config_volume_outlives_containers_and_reads_empty_when_emptied(
    backend: DockerBackend, docker_engine
) -> None:
    workspace_id = uuid.uuid4()
    first = _spec(workspace_id, 1)
    state = backend.prepare(first, {})
    backend.write_config(first, state, {"profile.sh": b"x"})
    state = backend.start(first, state)

    # A new cycle replaces the container; the volume (and its marker) stays.
    second = _spec(workspace_id, 2)
    state = backend.prepare(second, backend.stop(workspace_id, state, 1))
    assert backend.config_state(second, state) is ConfigState.PROVISIONED
    state = backend.start(second, state)
    [container] = _containers(docker_engine, workspace_id)
    assert container.labels[_label("generation")] == "2"

    # Emptied behind the platform's back: reads EMPTY, so the lifecycle recovers it.
    mount = settings.DOCKER_CONFIG_MOUNT
    result = container.exec_run(["sh", "-c", f"rm -rf {mount}/* {mount}/.[!.]*"])
    assert result.exit_code == 0, result.output
    assert backend.config_state(second, state) is ConfigState.EMPTY
    backend.remove(workspace_id, state)


def test_leftover_of_a_killed_cycle_is_replaced_never_a_conflict(
    backend: DockerBackend, docker_engine
) -> None:
    workspace_id = uuid.uuid4()
    # What a worker killed after `docker create` + `start` leaves: a running container with the
    # workspace's fixed name, an older generation and no saved state.
    leftover = docker_engine.containers.run(
        settings.DOCKER_AGENT_IMAGE,
        entrypoint=["sleep", "300"],
        name=f"ws-{workspace_id}",
        labels={_label("platform"): settings.PLATFORM_ID, _label("generation"): "3"},
        detach=True,
    )
    spec = _spec(workspace_id, 4)
    state = backend.prepare(spec, {})
    backend.write_config(spec, state, {})
    state = backend.start(spec, state)
    [container] = _containers(docker_engine, workspace_id)
    assert container.id != leftover.id
    assert container.status == "running"
    assert container.labels[_label("generation")] == "4"

    # Preparing the same cycle again adopts its own created container instead of replacing it.
    again = _spec(workspace_id, 5)
    state = backend.prepare(again, backend.stop(workspace_id, state, 1))
    created = docker_engine.containers.get(f"ws-{workspace_id}")
    assert backend.prepare(again, state)["container_id"] == created.id
    # A later generation whose create meets that container (409; no state names it) removes
    # it and creates its own.
    assert backend.prepare(_spec(workspace_id, 6), {})["container_id"] != created.id
    assert len(_containers(docker_engine, workspace_id)) == 1
    backend.remove(workspace_id, state)


def test_start_replaces_a_container_without_this_cycles_token(
    backend: DockerBackend, docker_engine
) -> None:
    workspace_id = uuid.uuid4()
    state = backend.prepare(_spec(workspace_id, 1), {})
    spec = _spec(workspace_id, 1, WORKSPACE_TOKEN="another-token")
    state = backend.start(spec, state)
    environ = _read(docker_engine, f"ws-{workspace_id}", "/proc/1/environ").split("\0")
    assert "WORKSPACE_TOKEN=another-token" in environ
    assert len(_containers(docker_engine, workspace_id)) == 1
    backend.remove(workspace_id, state)


def test_config_is_one_archive_with_the_marker_last(backend: DockerBackend, docker_engine) -> None:
    workspace_id = uuid.uuid4()
    spec = _spec(workspace_id, 1)
    state = backend.prepare(spec, {})
    requests_made: list[str] = []

    def count(response: Any, *args: Any, **kwargs: Any) -> None:
        requests_made.append(f"{response.request.method} {response.request.path_url}")

    hooks = backend.client.api.hooks["response"]
    hooks.append(count)
    try:
        # A template file named like the marker never stands in for it.
        backend.write_config(spec, state, {"a.txt": b"a", CONFIG_MARKER: b"not the marker"})
    finally:
        hooks.remove(count)
    assert [line.split()[0] for line in requests_made] == ["PUT"], requests_made
    assert backend.config_state(spec, state) is ConfigState.PROVISIONED
    state = backend.start(spec, state)
    mount = settings.DOCKER_CONFIG_MOUNT
    name = f"ws-{workspace_id}"
    assert _read(docker_engine, name, f"{mount}/a.txt") == "a"
    assert '"generation": 1' in _read(docker_engine, name, f"{mount}/{CONFIG_MARKER}")
    backend.remove(workspace_id, state)


def test_config_calls_on_a_vanished_container_say_it_is_gone(
    backend: DockerBackend, docker_engine
) -> None:
    workspace_id = uuid.uuid4()
    spec = _spec(workspace_id, 1)
    state = backend.prepare(spec, {})
    docker_engine.containers.get(f"ws-{workspace_id}").remove(force=True)
    for call in (
        lambda: backend.config_state(spec, state),
        lambda: backend.write_config(spec, state, {"a.txt": b"a"}),
    ):
        with pytest.raises(BackendError, match="is gone; the next cycle recreates it"):
            call()
    backend.remove(workspace_id, state)


def test_list_instances_is_three_engine_calls_and_only_this_platform(
    backend: DockerBackend, docker_engine
) -> None:
    ours = [uuid.uuid4() for _ in range(3)]
    for workspace_id in ours:
        backend.prepare(_spec(workspace_id, 1), {})
    foreign_id = uuid.uuid4()
    foreign = docker_engine.containers.create(
        settings.DOCKER_AGENT_IMAGE,
        name=f"ws-{foreign_id}",
        labels={_label("platform"): "another-platform", _label("workspace-id"): str(foreign_id)},
    )
    # Count the HTTP requests the client makes (requests' response hook on the client session).
    requests_made: list[str] = []

    def count(response: Any, *args: Any, **kwargs: Any) -> None:
        requests_made.append(response.url)

    hooks = backend.client.api.hooks["response"]
    hooks.append(count)
    try:
        listed = {info.workspace_id for info in backend.list_instances()}
    finally:
        hooks.remove(count)
    # One containers, one volumes and one networks list, whatever the number of workspaces.
    assert len(requests_made) == 3, requests_made
    assert {str(workspace_id) for workspace_id in ours} <= listed
    assert str(foreign_id) not in listed
    foreign.remove(force=True)
    for workspace_id in ours:
        backend.remove(workspace_id, {})


def test_unreachable_engine_is_unavailable_naming_docker_and_the_reason(
    docker_engine, settings, tmp_path
) -> None:
    settings.DOCKER_HOST = f"unix://{tmp_path}/no-engine.sock"
    backend = FACTORIES["docker"]()
    with pytest.raises(BackendUnavailable) as raised:
        backend.check_available()
    message = str(raised.value)
    assert "'docker'" in message
    assert "no-engine.sock" in message
    assert "No such file or directory" in message
    # Mid-cycle the same failure is transient: the task retries it with a limit.
    with pytest.raises(TransientBackendError, match="cannot reach the engine"):
        backend.status(uuid.uuid4(), {})


def test_missing_image_is_a_clear_permanent_error(backend: DockerBackend, docker_engine) -> None:
    workspace_id = uuid.uuid4()
    base = _spec(workspace_id, 1)
    template = Template(name="ghost", path=base.template.path, runtime="shell", image="nope:1")
    spec = LaunchSpec(workspace_id, 1, template, base.env, uid=base.uid)
    with pytest.raises(BackendError) as raised:
        backend.prepare(spec, {})
    assert not isinstance(raised.value, TransientBackendError)
    assert "nope:1" in str(raised.value)
    assert "build_agent_image" in str(raised.value)
    backend.remove(workspace_id, {})


def test_a_command_missing_from_the_image_is_a_permanent_error(
    backend: DockerBackend, docker_engine
) -> None:
    workspace_id = uuid.uuid4()
    base = _spec(workspace_id, 1)
    template = Template(
        name="broken", path=base.template.path, runtime="shell", command=("/no/such/agent",)
    )
    spec = LaunchSpec(workspace_id, 1, template, base.env, uid=base.uid)
    state = backend.prepare(spec, {})
    with pytest.raises(BackendError) as raised:
        backend.start(spec, state)
    assert not isinstance(raised.value, TransientBackendError)
    assert "/no/such/agent" in str(raised.value)
    backend.remove(workspace_id, {})


@pytest.mark.parametrize("sandbox", ["runc", "gvisor"])
def test_agent_exits_nonzero_when_the_platform_rejects_its_token(
    backend: DockerBackend, docker_engine, registry_listener, transactional_db, sandbox: str
) -> None:
    """Under each sandbox: under gVisor the agent's HTTP client is nc, whose answer it reads."""
    if sandbox == "gvisor":
        require_gvisor(docker_engine)
    workspace_id = uuid.uuid4()
    # The boot delay keeps the agent up until start() has seen it running: the registry
    # answers fast, and an agent rejected before that would read as "exited at once".
    spec = _spec(
        workspace_id,
        1,
        sandbox=sandbox,
        PLATFORM_URL=registry_listener.url,
        AGENT_BOOT_DELAY_SECONDS="1",
    )
    state = backend.start(spec, backend.prepare(spec, {}))
    container = docker_engine.containers.get(f"ws-{workspace_id}")

    def exited() -> bool:
        container.reload()
        return container.status == "exited"

    wait_for(exited, timeout=30, message="the rejected agent to exit")
    assert container.attrs["State"]["ExitCode"] == 3
    logs = container.logs().decode()
    assert "server returned error: HTTP/1.1 401 Unauthorized" in logs, logs
    assert "secret-token" not in logs
    backend.remove(workspace_id, state)


def test_build_agent_image_command_builds_the_image(docker_engine) -> None:
    from django.core.management import call_command

    call_command("build_agent_image", "--tag", "workspace-agent:test-build")
    image = docker_engine.images.get("workspace-agent:test-build")
    assert image.attrs["Config"]["Entrypoint"] == ["/bin/sh", "/agent.sh"]
    assert image.attrs["Size"] < 10_000_000
    docker_engine.images.remove("workspace-agent:test-build")


def test_logs_are_the_containers_output_tail_bounded(backend: DockerBackend) -> None:
    workspace_id = uuid.uuid4()
    assert backend.logs(workspace_id, {}, 10, 4096) == ""  # no container: no output
    spec = _spec(workspace_id, 1)
    state = backend.prepare(spec, {})
    backend.start(spec, state)
    try:
        # The agent keeps retrying registration against a closed port and says so.
        output = wait_for(
            lambda: backend.logs(workspace_id, {}, 50, 64 * 1024), message="agent output"
        )
        assert "agent:" in output
        wait_for(lambda: len(backend.logs(workspace_id, {}, 50, 64 * 1024).splitlines()) >= 2)
        assert len(backend.logs(workspace_id, {}, 1, 64 * 1024).splitlines()) == 1
        assert len(backend.logs(workspace_id, {}, 50, 1024).encode()) <= 1024
        backend.stop(workspace_id, {}, grace_seconds=1)
        # An exited container's output is still there until it is removed.
        assert "agent:" in backend.logs(workspace_id, {}, 50, 64 * 1024)
    finally:
        backend.remove(workspace_id, {})
    assert backend.logs(workspace_id, {}, 10, 4096) == ""


def _engine_calls(backend: DockerBackend, steps: Callable[[], None]) -> list[str]:
    """The engine requests ``steps()`` makes: method and path without the API version, with
    the workspace's names and the engine's ids shown as ``<name>`` and ``<id>``."""
    made: list[str] = []

    def record(response: Any, *args: Any, **kwargs: Any) -> None:
        path = response.request.path_url.split("?")[0].split("/", 2)[2]
        path = re.sub(r"ws-[0-9a-f-]{36}(-net)?", "<name>", path)
        made.append(f"{response.request.method} /{re.sub(r'[0-9a-f]{64}', '<id>', path)}")

    hooks = backend.client.api.hooks["response"]
    hooks.append(record)
    try:
        steps()
    finally:
        hooks.remove(record)
    return made


@pytest.mark.parametrize("delivery", ["image", "archive"])
@pytest.mark.parametrize("network_mode", ["veth", "workspace", "host"])
def test_a_provision_makes_the_fewest_engine_calls(
    backend: DockerBackend, docker_engine, settings, network_mode: str, delivery: str
) -> None:
    """The engine spends CPU per call. A first provision: the network (create, inspect; veth
    makes its link outside the engine), the
    container with its volume (one create; with DOCKER_CONFIG_DELIVERY=image the engine copies
    the template's files in from the config image as it creates it), the config archive (only
    with DOCKER_CONFIG_DELIVERY=archive), start and one inspect. A restart removes the old
    container by id and inspects the network by name: no lookups."""
    settings.DOCKER_NETWORK_MODE = network_mode
    settings.DOCKER_CONFIG_DELIVERY = delivery
    settings.DOCKER_HOST_FIREWALL = "off"  # the firewall is the isolation tests' subject
    state: dict[str, Any] = {}

    def cycle(workspace_id: uuid.UUID, generation: int) -> None:
        nonlocal state
        spec = _spec(workspace_id, generation)
        state = backend.prepare(spec, state)
        if not backend.config_in_image(spec):
            backend.write_config(spec, state, {"a.txt": b"a"})
        state = backend.start(spec, state)

    # A first workspace on this engine builds the config image (and reads the base image's id).
    warm = uuid.uuid4()
    cycle(warm, 1)
    backend.remove(warm, state)
    state = {}
    workspace_id = uuid.uuid4()
    own = network_mode == "workspace"
    container = [
        "POST /containers/create",
        *(["PUT /containers/<name>/archive"] if delivery == "archive" else []),
        "POST /containers/<id>/start",
        "GET /containers/<id>/json",
    ]
    first = _engine_calls(backend, lambda: cycle(workspace_id, 1))
    assert first == [
        *(["POST /networks/create", "GET /networks/<id>"] if own else []),
        *container,
    ], first
    backend.stop(workspace_id, state, 1)
    again = _engine_calls(backend, lambda: cycle(workspace_id, 2))
    assert again == [
        "DELETE /containers/<id>",
        *(["GET /networks/<name>"] if own else []),
        *container,
    ], again
    [current] = _containers(docker_engine, workspace_id)
    assert current.labels[_label("generation")] == "2" and current.status == "running"
    backend.remove(workspace_id, state)


def test_config_image_fills_an_empty_volume_and_never_a_used_one(
    backend: DockerBackend, docker_engine, settings
) -> None:
    """DOCKER_CONFIG_DELIVERY=image: the engine copies the template's files, the marker and the
    copy flag into the config volume when it creates a container and the volume is empty (a
    first provision, or one emptied behind the platform's back), and leaves a volume in use as it
    is."""
    settings.DOCKER_CONFIG_DELIVERY = "image"
    workspace_id = uuid.uuid4()
    mount = settings.DOCKER_CONFIG_MOUNT
    name = f"ws-{workspace_id}"

    def provision(generation: int, state: dict[str, Any]) -> dict[str, Any]:
        spec = _spec(workspace_id, generation)
        assert backend.config_in_image(spec)
        return backend.start(spec, backend.prepare(spec, state))

    def listing() -> set[str]:
        found = docker_engine.containers.get(name).exec_run(["ls", "-A", mount])
        assert found.exit_code == 0, found.output
        return set(found.output.decode().split())

    state = provision(1, {})
    # The template's config image, made FROM the agent image on this engine.
    image = docker_engine.containers.get(name).image
    assert image.tags[0].startswith(f"{settings.DOCKER_CONFIG_IMAGE}:shell-default-"), image.tags
    base_layers = docker_engine.images.get(settings.DOCKER_AGENT_IMAGE).attrs["RootFS"]["Layers"]
    assert image.attrs["RootFS"]["Layers"][: len(base_layers)] == base_layers
    template_files = set(templates().get("shell-default").config_files())  # type: ignore[union-attr]
    assert listing() == template_files | {CONFIG_MARKER, CONFIG_COPIED}
    assert '"source": "image"' in _read(docker_engine, name, f"{mount}/{CONFIG_MARKER}")
    # In use (the agent dropped the flag, the user wrote a file): a new container keeps it.
    container = docker_engine.containers.get(name)
    changed = container.exec_run(
        ["sh", "-c", f"rm {mount}/{CONFIG_COPIED} && echo mine > {mount}/user.txt"]
    )
    assert changed.exit_code == 0, changed.output
    state = provision(2, backend.stop(workspace_id, state, 1))
    assert listing() == template_files | {CONFIG_MARKER, "user.txt"}
    # Emptied: the next container's creation fills it again, flag included.
    emptied = docker_engine.containers.get(name).exec_run(
        ["sh", "-c", f"rm -rf {mount}/* {mount}/.[!.]*"]
    )
    assert emptied.exit_code == 0, emptied.output
    state = provision(3, backend.stop(workspace_id, state, 1))
    assert listing() == template_files | {CONFIG_MARKER, CONFIG_COPIED}
    backend.remove(workspace_id, state)
