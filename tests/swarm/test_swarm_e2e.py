"""The Swarm backend end to end on a real one-node swarm: a real Celery worker on the backend, a
real agent in each service's task registering through the registry listener, and the reconciler
against the real manager."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends import backend_named, reset_backends
from provisioning.backends.base import CONFIG_MARKER
from provisioning.backends.engine import label as _label
from provisioning.backends.engine import platform_filter, workspace_filter
from provisioning.reconciler import Drift, reconcile_once
from tests.support import api_events, settled, wait_for
from tests.swarm.conftest import Swarm
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]
S = WorkspaceStatus
SECRET_VALUE = "never-in-the-service-spec-4f1c"


def _create(api: Any, name: str, **body: Any) -> str:
    response = api.post(
        "/api/workspaces/", {"name": name, "template": "shell-default", **body}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["backend"] == "swarm"
    return str(response.json()["id"])


def _wait(workspace_id: str, status: WorkspaceStatus, after_generation: int = 0) -> Workspace:
    def reached() -> Workspace | None:
        row = Workspace.objects.get(id=workspace_id)
        if row.generation > after_generation:
            assert row.status != S.FAILED or status == S.FAILED, row.last_error
        found = settled(workspace_id, status)
        return found if found is not None and found.generation > after_generation else None

    return wait_for(reached, timeout=90, message=f"workspace {workspace_id} {status}")


def _objects(swarm: Swarm, workspace_id: str) -> dict[str, list[Any]]:
    labelled = {"label": [platform_filter(), workspace_filter(workspace_id)]}
    return {
        "services": swarm.client.services.list(filters=labelled),
        "configs": swarm.client.configs.list(filters=labelled),
        "secrets": swarm.client.secrets.list(filters=labelled),
    }


def _container(swarm: Swarm, workspace_id: str) -> Any:
    """The running container of the workspace's task (one node: the manager's engine)."""
    labelled: dict[str, Any] = {
        "label": [platform_filter(), workspace_filter(workspace_id)],
        "status": "running",
    }
    [container] = swarm.client.containers.list(filters=labelled)
    return container


def _config_files(container: Any) -> set[str]:
    result = container.exec_run(["ls", "-A", settings.DOCKER_CONFIG_MOUNT])
    assert result.exit_code == 0, result.output
    return set(result.output.decode().split())


def test_swarm_provision_stop_start_recover_remove(api, on_swarm, swarm) -> None:
    workspace_id = _create(api, "swarmed", env={"GREETING": SECRET_VALUE})
    online = _wait(workspace_id, S.ONLINE)
    assert online.is_running

    [service] = _objects(swarm, workspace_id)["services"]
    spec = service.attrs["Spec"]
    assert spec["Name"] == f"ws-{workspace_id}"
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
    assert spec["Labels"][_label("generation")] == str(online.generation)
    task = spec["TaskTemplate"]
    assert task["RestartPolicy"]["Condition"] == "none"
    container_spec = task["ContainerSpec"]
    assert container_spec["User"] == settings.DOCKER_WORKSPACE_USER
    assert container_spec["CapabilityDrop"] == ["ALL"]
    assert container_spec["StopGracePeriod"] == settings.STOP_GRACE_SECONDS * 10**9
    assert task["Resources"]["Limits"]["Pids"] == settings.DOCKER_DEFAULT_PIDS
    # The agent's token and the user's env are in a secret: inspect never shows them.
    inspected = json.dumps(service.attrs)
    assert SECRET_VALUE not in inspected
    assert "WORKSPACE_TOKEN" not in inspected
    [secret] = _objects(swarm, workspace_id)["secrets"]
    assert secret.name == f"ws-{workspace_id}-env-g{online.generation}"

    container = _container(swarm, workspace_id)
    assert {CONFIG_MARKER, "profile.sh"} <= _config_files(container)
    environ = container.exec_run(["cat", "/proc/1/environ"]).output.split(b"\0")
    assert f"GREETING={SECRET_VALUE}".encode() in environ
    status = container.exec_run(["cat", "/proc/1/status"]).output.decode()
    assert f"Uid:\t{settings.DOCKER_WORKSPACE_USER.split(':')[0]}\t" in status
    assert "CapEff:\t0000000000000000" in status

    # Stop: the service stays, scaled to nothing; start: a new cycle, one service.
    assert api.post(f"/api/workspaces/{workspace_id}/stop/").status_code == 202
    _wait(workspace_id, S.STOPPED)
    [service] = _objects(swarm, workspace_id)["services"]
    assert service.attrs["Spec"]["Mode"] == {"Replicated": {"Replicas": 0}}
    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202
    started = _wait(workspace_id, S.ONLINE, after_generation=online.generation)
    [service] = _objects(swarm, workspace_id)["services"]
    assert service.attrs["Spec"]["Labels"][_label("generation")] == str(started.generation)
    # One secret (this cycle's token); the config set of the first generation is kept.
    assert [s.name for s in _objects(swarm, workspace_id)["secrets"]] == [
        f"ws-{workspace_id}-env-g{started.generation}"
    ]

    # Behind the platform's back: the service and every config of the workspace removed. The
    # next start finds no config, writes it from the template and says so.
    assert api.post(f"/api/workspaces/{workspace_id}/stop/").status_code == 202
    _wait(workspace_id, S.STOPPED)
    service.remove()
    configs = _objects(swarm, workspace_id)["configs"]
    assert configs
    for config in configs:
        wait_for(lambda c=config: _removed(c), timeout=60, message=f"remove {config.name}")  # type: ignore[misc]
    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202
    recovered = _wait(workspace_id, S.ONLINE, after_generation=started.generation)
    assert {CONFIG_MARKER, "profile.sh"} <= _config_files(_container(swarm, workspace_id))
    recoveries = [
        e for e in api_events(api, workspace_id) if e["type"] == EventType.CONFIG_RECOVERED
    ]
    assert len(recoveries) == 1
    assert recoveries[0]["generation"] == recovered.generation
    assert recoveries[0]["payload"] == {"template": "shell-default", "fallback": False}

    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    removed = _wait(workspace_id, S.REMOVED)
    assert removed.is_running is False
    assert _objects(swarm, workspace_id) == {"services": [], "configs": [], "secrets": []}
    types = [event["type"] for event in api_events(api, workspace_id)]
    assert types.count(EventType.ONLINE) == 3
    assert EventType.PROVISION_FAILED not in types


def _removed(item: Any) -> bool:
    import docker.errors

    try:
        item.remove()
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError:
        return False  # still in use by the service being removed
    return True


def test_reconciler_repairs_a_task_killed_behind_the_platforms_back(
    api, on_swarm, swarm, docker_worker
) -> None:
    workspace_id = _create(api, "killed")
    _wait(workspace_id, S.ONLINE)
    _container(swarm, workspace_id).kill()  # through the engine; nothing tells the platform

    def task_ended() -> bool:
        tasks = swarm.client.api.tasks(filters={"label": workspace_filter(workspace_id)})
        return bool(tasks) and all(t["Status"]["State"] != "running" for t in tasks)

    wait_for(task_ended, timeout=60, message="the task to end")
    report = reconcile_once()

    # Under the default restart policy (on-failure): offline with the exit code, and a restart
    # scheduled, as on Docker (tests/provisioning/test_reconcile_docker.py).
    workspace = Workspace.objects.get(id=workspace_id)
    assert (workspace.status, workspace.is_running) == (S.OFFLINE, False)
    assert "exit code 137" in workspace.last_error
    assert workspace.restart_at is not None
    [event] = WorkspaceEvent.objects.filter(workspace=workspace, source=EventSource.RECONCILER)
    assert event.type == EventType.OFFLINE
    assert event.payload["exit_code"] == 137
    assert event.payload["restart_attempt"] == 1
    assert "with code 137" in event.payload["detail"]
    assert "on node" in event.payload["detail"]
    assert [r.drift for r in report.repairs if r.workspace_id == workspace_id] == [Drift.GONE]
    assert report.backend_calls["swarm.list_instances"] == 1
    assert [r for r in reconcile_once().repairs if r.workspace_id == workspace_id] == []

    # Started again, it runs (a new service task); then removed, nothing is left.
    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202
    _wait(workspace_id, S.ONLINE, after_generation=workspace.generation)
    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    _wait(workspace_id, S.REMOVED)
    assert _objects(swarm, workspace_id) == {"services": [], "configs": [], "secrets": []}


def test_orphan_services_removed_another_platforms_untouched(user, on_swarm, swarm) -> None:
    orphan, foreign = str(uuid.uuid4()), str(uuid.uuid4())

    def sleeper(workspace_id: str, platform: str) -> Any:
        labels = {
            _label("platform"): platform,
            _label("workspace-id"): workspace_id,
            _label("generation"): "1",
        }
        return swarm.client.services.create(
            settings.DOCKER_AGENT_IMAGE,
            ["sleep", "600"],
            name=f"orphan-{workspace_id}",
            labels=labels,
            container_labels=labels,
            networks=["host"],
        )

    sleeper(orphan, settings.PLATFORM_ID)
    other = sleeper(foreign, "another-platform")
    try:
        wait_for(
            lambda: any(i.workspace_id == orphan for i in backend_named("swarm").list_instances()),
            timeout=60,
            message="the orphan's task listed",
        )
        reconcile_once()
        assert _objects(swarm, orphan)["services"] == []
        other.reload()  # still there
    finally:
        other.remove()


def test_the_docker_backend_on_the_same_engine_leaves_swarm_tasks_alone(
    api, on_swarm, swarm, settings
) -> None:
    """A swarm manager's engine also answers the Docker backend, and a task's container carries
    its service's labels: the Docker backend must not take it for an orphan of its own."""
    workspace_id = _create(api, "beside-docker")
    _wait(workspace_id, S.ONLINE)
    tasks = swarm.client.containers.list(filters={"label": workspace_filter(workspace_id)})
    assert tasks, "the task's container carries the platform's labels"
    settings.DOCKER_HOST = swarm.host
    reset_backends()
    try:
        docker_backend = backend_named("docker")
        listed = docker_backend.list_instances()
        assert workspace_id not in {instance.workspace_id for instance in listed}
        report = reconcile_once(backends={"docker": docker_backend})
        assert [repair for repair in report.repairs if repair.workspace_id == workspace_id] == []
    finally:
        reset_backends()
    assert _wait(workspace_id, S.ONLINE).status == S.ONLINE
    after = swarm.client.containers.list(filters={"label": workspace_filter(workspace_id)})
    assert [container.id for container in after] == [container.id for container in tasks]
