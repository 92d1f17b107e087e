"""Drift behind the platform's back on the real Docker engine: a killed container, a removed
container, orphan containers and volumes, a container running while the row says stopped, and
another platform's objects on the same engine. Workspaces that go online do it through a real
Celery worker on the Docker backend and a real agent in its container (``on_docker``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.utils import timezone

from provisioning.backends import backend_named
from provisioning.backends.docker import DockerBackend
from provisioning.backends.engine import label as _label
from provisioning.backends.engine import platform_filter
from provisioning.reconciler import Drift, reconcile_once
from tests.support import docker_containers, settled, wait_for
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.django_db(transaction=True)]
OTHER_PLATFORM = "another-platform"


@pytest.fixture
def engine(docker_engine: Any) -> Iterator[Any]:
    """The engine, left without this platform's containers and volumes after each test (the
    passes here remove any orphan they see, so leftovers of one test must not feed the next)."""
    yield docker_engine
    labelled: dict[str, Any] = {"label": platform_filter()}
    for container in docker_engine.containers.list(all=True, filters=labelled, sparse=True):
        container.remove(force=True)
    for volume in docker_engine.volumes.list(filters=labelled):
        volume.remove(force=True)


def _labels(workspace_id: uuid.UUID | str, platform: str | None = None) -> dict[str, str]:
    return {
        _label("platform"): platform or settings.PLATFORM_ID,
        _label("workspace-id"): str(workspace_id),
        _label("generation"): "1",
    }


def _sleeper(engine: Any, workspace_id: uuid.UUID | str, *, name: str = "", **kw: Any) -> Any:
    """A running container from the agent image that only sleeps (busybox), with the labels
    the platform puts on its own; a config volume labelled the same way is mounted."""
    platform = kw.pop("platform", None)
    volume = engine.volumes.create(
        name=f"{name or f'ws-{workspace_id}'}-configs", labels=_labels(workspace_id, platform)
    )
    return engine.containers.run(
        settings.DOCKER_AGENT_IMAGE,
        entrypoint=["sleep", "600"],
        name=name or f"ws-{workspace_id}",
        labels=_labels(workspace_id, platform),
        volumes={volume.name: {"bind": settings.DOCKER_CONFIG_MOUNT, "mode": "rw"}},
        network_mode="none",
        detach=True,
        **kw,
    )


def _row(owner: Any, name: str, *, status: WorkspaceStatus = S.ONLINE) -> Workspace:
    now = timezone.now()
    running = status == S.ONLINE
    return Workspace.objects.create(
        owner=owner,
        name=name,
        template="shell-default",
        runtime="shell",
        backend="docker",
        status=status,
        desired_state=DesiredState.RUNNING if running else DesiredState.REMOVED,
        is_running=running,
        last_started_at=now if running else None,
        last_heartbeat_at=now if running else None,
        generation=1,
        requested_seq=1,
        handled_seq=1,
    )


def _create_online(api: Any, name: str) -> Workspace:
    response = api.post(
        "/api/workspaces/", {"name": name, "template": "shell-default"}, format="json"
    )
    assert response.status_code == 201, response.content
    workspace_id = response.json()["id"]
    assert response.json()["backend"] == "docker"

    def online() -> Workspace | None:
        workspace = Workspace.objects.get(id=workspace_id)
        assert workspace.status != S.FAILED, workspace.last_error
        # Online is not enough: until the cycle lets go of the gate and every request is
        # handled, a reconcile pass skips the row as busy (see tests.support.settled).
        return settled(workspace_id, S.ONLINE)

    workspace = wait_for(online, timeout=60, message=f"{name} online")
    return workspace


def _wait_status(workspace: Workspace, status: WorkspaceStatus) -> Workspace:
    def reached() -> Workspace | None:
        return settled(workspace.id, status)

    return wait_for(reached, timeout=60, message=f"{workspace.name} {status}")


def _delete(api: Any, workspace: Workspace) -> None:
    assert api.delete(f"/api/workspaces/{workspace.id}/").status_code == 202
    _wait_status(workspace, S.REMOVED)


def _reconciler_events(workspace: Workspace) -> list[WorkspaceEvent]:
    return list(WorkspaceEvent.objects.filter(workspace=workspace, source=EventSource.RECONCILER))


def _repairs_of(report: Any, workspace_id: uuid.UUID | str) -> list[Drift]:
    return [r.drift for r in report.repairs if r.workspace_id == str(workspace_id)]


def _exited(container: Any) -> bool:
    container.reload()
    return bool(container.status == "exited")


@pytest.mark.parametrize(
    ("action", "status", "code", "event_type"),
    [
        # Under the default restart policy (on-failure) both are deaths of a workspace wanted
        # running: offline, with the exit code, and a restart scheduled (test_restart_policy.py).
        ("kill", S.OFFLINE, 137, EventType.OFFLINE),  # SIGKILL: a crash, with its code
        ("stop", S.OFFLINE, 0, EventType.OFFLINE),  # SIGTERM: the agent exits cleanly
    ],
)
def test_container_killed_or_stopped_behind_the_platforms_back(
    api, on_docker, engine, platform_url, action, status, code, event_type
) -> None:
    workspace = _create_online(api, f"{action}ed")
    [container] = docker_containers(engine, str(workspace.id))
    getattr(container, action)()  # through the engine; nothing tells the platform
    wait_for(lambda: _exited(container), timeout=30, message="the container to exit")
    workspace.refresh_from_db()
    assert (workspace.status, workspace.is_running) == (S.ONLINE, True)

    report = reconcile_once()

    workspace.refresh_from_db()
    assert (workspace.status, workspace.is_running) == (status, False)
    (event,) = _reconciler_events(workspace)
    assert event.type == event_type
    assert event.payload["exit_code"] == code
    assert event.payload["previous"] == S.ONLINE
    assert f"exited with code {code}" in event.payload["detail"]
    assert event.payload["restart_attempt"] == 1
    assert workspace.restart_at is not None
    if action == "kill":
        assert "exit code 137" in workspace.last_error
        assert "(SIGKILL)" in event.payload["detail"]
    assert _repairs_of(report, workspace.id) == [Drift.GONE]
    assert report.backend_calls["docker.list_instances"] == 1
    # A second pass has nothing left to repair; the container is still there, exited.
    assert _repairs_of(reconcile_once(), workspace.id) == []
    assert [c.status for c in docker_containers(engine, str(workspace.id))] == ["exited"]
    _delete(api, workspace)


def test_removed_container_makes_the_workspace_offline_and_start_recovers(
    api, on_docker, engine, platform_url
) -> None:
    workspace = _create_online(api, "vanished")
    [container] = docker_containers(engine, str(workspace.id))
    container.remove(force=True)  # docker rm -f

    report = reconcile_once()

    workspace.refresh_from_db()
    assert (workspace.status, workspace.is_running) == (S.OFFLINE, False)
    (event,) = _reconciler_events(workspace)
    assert event.type == EventType.OFFLINE
    assert event.payload["reason"] == "instance_gone"
    assert event.payload["detail"] == "no container"
    assert _repairs_of(report, workspace.id) == [Drift.GONE]
    # The reconciler restarts nothing; a start does, with a new container.
    generation = workspace.generation
    assert api.post(f"/api/workspaces/{workspace.id}/start/").status_code == 202
    assert _wait_status(workspace, S.ONLINE).generation > generation
    [again] = docker_containers(engine, str(workspace.id))
    assert again.status == "running"
    _delete(api, workspace)


def test_running_container_of_a_stopped_workspace_is_stopped(
    api, on_docker, engine, platform_url, settings
) -> None:
    settings.STOP_GRACE_SECONDS = 1  # `sleep` as pid 1 ignores SIGTERM: the engine kills it
    workspace = _create_online(api, "unwanted")
    assert api.post(f"/api/workspaces/{workspace.id}/stop/").status_code == 202
    _wait_status(workspace, S.STOPPED)
    # Someone runs the workspace's container again behind the platform's back.
    for old in docker_containers(engine, str(workspace.id)):
        old.remove(force=True)
    container = _sleeper(engine, workspace.id)
    listed = {i.workspace_id: i for i in backend_named("docker").list_instances()}
    assert listed[str(workspace.id)].running is True

    report = reconcile_once()

    container.reload()
    assert container.status == "exited"
    workspace.refresh_from_db()
    assert (workspace.status, workspace.is_running) == (S.STOPPED, False)
    (event,) = _reconciler_events(workspace)
    assert event.type == EventType.STOPPED
    assert event.payload["reason"] == "running_while_not_wanted"
    assert _repairs_of(report, workspace.id) == [Drift.UNWANTED]
    _delete(api, workspace)


def test_orphans_removed_with_their_volumes_and_another_platform_untouched(
    user, engine, settings
) -> None:
    settings.WORKSPACE_BACKEND = "docker"
    removed = _row(user, "gone", status=S.REMOVED)
    kept = _row(user, "kept")
    unknown_id, volume_only_id = uuid.uuid4(), uuid.uuid4()
    kept_container = _sleeper(engine, kept.id)
    _sleeper(engine, removed.id)
    # Made by hand: our labels, not our name. Removal goes by label, not by ws-<id>.
    _sleeper(engine, unknown_id, name=f"stray-{unknown_id.hex[:8]}")
    # A config volume whose container is gone (an interrupted removal).
    engine.volumes.create(name=f"ws-{volume_only_id}-configs", labels=_labels(volume_only_id))
    # Another platform on the same engine, with ids this platform calls orphans.
    foreign = [
        _sleeper(engine, unknown_id, name=f"ws-{unknown_id}", platform=OTHER_PLATFORM),
        _sleeper(engine, removed.id, name=f"other-{removed.id}", platform=OTHER_PLATFORM),
    ]
    foreign_volume = engine.volumes.create(
        name=f"other-{volume_only_id}-configs", labels=_labels(volume_only_id, OTHER_PLATFORM)
    )

    try:
        report = reconcile_once()

        orphans = {str(unknown_id), str(removed.id), str(volume_only_id)}
        assert {r.workspace_id for r in report.repairs} == orphans
        assert all(r.drift is Drift.ORPHAN for r in report.repairs)
        ours = engine.containers.list(all=True, filters={"label": platform_filter()})
        assert [c.id for c in ours] == [kept_container.id]
        our_volumes = engine.volumes.list(filters={"label": platform_filter()})
        assert [v.name for v in our_volumes] == [f"ws-{kept.id}-configs"]
        for container in foreign:
            container.reload()
            assert container.status == "running"
        foreign_volume.reload()
        removed.refresh_from_db()
        assert removed.status == S.REMOVED
        assert [e.type for e in _reconciler_events(removed)] == [EventType.REMOVED]
        assert _reconciler_events(kept) == []
        assert reconcile_once().repairs == []
    finally:
        theirs: dict[str, Any] = {"label": f"{_label('platform')}={OTHER_PLATFORM}"}
        for container in engine.containers.list(all=True, filters=theirs, sparse=True):
            container.remove(force=True)
        for volume in engine.volumes.list(filters=theirs):
            volume.remove(force=True)


def test_an_orphan_network_is_removed_and_another_platforms_is_not(user, engine, settings) -> None:
    settings.WORKSPACE_BACKEND = "docker"
    orphan_id = uuid.uuid4()
    # What an interrupted removal leaves: the workspace's network, container and volume gone.
    ours = engine.networks.create(
        f"ws-{orphan_id}-net", driver="bridge", internal=True, labels=_labels(orphan_id)
    )
    theirs = engine.networks.create(
        f"other-{orphan_id}-net",
        driver="bridge",
        internal=True,
        labels=_labels(orphan_id, OTHER_PLATFORM),
    )
    try:
        report = reconcile_once()
        assert [(r.workspace_id, r.drift) for r in report.repairs] == [
            (str(orphan_id), Drift.ORPHAN)
        ]
        assert engine.networks.list(ids=[ours.id]) == []
        theirs.reload()  # still there
        assert reconcile_once().repairs == []
    finally:
        theirs.remove()


def test_a_pass_costs_the_same_engine_calls_for_3_or_15_workspaces(user, engine, settings) -> None:
    settings.WORKSPACE_BACKEND = "docker"
    backend = backend_named("docker")
    assert isinstance(backend, DockerBackend)
    requests_made: list[str] = []

    def count(response: Any, *args: Any, **kwargs: Any) -> None:
        requests_made.append(f"{response.request.method} {urlsplit(response.url).path}")

    def one_pass() -> list[str]:
        requests_made.clear()
        hooks = backend.client.api.hooks["response"]
        hooks.append(count)
        try:
            report = reconcile_once()
        finally:
            hooks.remove(count)
        assert report.repairs == [], report.repairs
        return sorted(request.split("/", 2)[-1] for request in requests_made)

    def add(count: int) -> list[Any]:
        made = []
        for _ in range(count):
            row = _row(user, f"calls-{uuid.uuid4().hex[:8]}")
            made.append(_sleeper(engine, row.id))
        return made

    containers = add(3)
    # A paused container is silent, not dead: the liveness window's business, not a repair.
    containers[0].pause()
    few = one_pass()
    containers += add(12)
    many = one_pass()
    assert few == many, (few, many)
    # The engine's ping (the backend's availability check), one containers list, one volumes
    # list, one networks list: nothing per workspace.
    assert len(many) == 4, many
    assert any("containers/json" in request for request in many)
    assert any("volumes" in request for request in many)
    containers[0].unpause()
