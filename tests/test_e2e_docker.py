"""End to end on the Docker backend: a real engine, a real Celery worker, real agents.

The agents run in ``workspace-agent:dev`` containers with host networking and call the live test
server on loopback. The worker consumes its own queue (see ``on_docker``), so no other worker of
the session touches these workspaces.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings

from provisioning.backends.base import CONFIG_COPIED, CONFIG_MARKER
from provisioning.backends.engine import label as _label
from tests.support import api_events, api_workspace, docker_containers, wait_api_status, wait_for
from workspaces.models import Workspace
from workspaces.status import EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus


def running_container(engine: Any, workspace_id: str) -> Any:
    [container] = docker_containers(engine, workspace_id)
    assert container.name == f"ws-{workspace_id}"
    assert container.status == "running"
    return container


def config_files(container: Any) -> set[str]:
    result = container.exec_run(["ls", "-A", settings.DOCKER_CONFIG_MOUNT])
    assert result.exit_code == 0, result.output
    return set(result.output.decode().split())


def test_docker_post_online_restart_recover_delete(
    api, on_docker, docker_engine, platform_url
) -> None:
    response = api.post(
        "/api/workspaces/",
        {"name": "dock", "template": "shell-default", "env": {"GREETING": "hi"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["backend"] == "docker"
    workspace_id = created["id"]

    online = wait_api_status(api, workspace_id, S.ONLINE)
    assert online["is_running"] is True
    assert online["last_started_at"] is not None
    container = running_container(docker_engine, workspace_id)
    assert container.labels[_label("generation")] == str(online["generation"])
    mounts = container.attrs["Mounts"]
    assert [(m["Name"], m["Destination"]) for m in mounts] == [
        (f"ws-{workspace_id}-configs", settings.DOCKER_CONFIG_MOUNT)
    ]
    assert {CONFIG_MARKER, "profile.sh"} <= config_files(container)
    # The engine copied the template in from its config image; the agent reported the copy at
    # registration and dropped the flag (a first population: no recovery event).
    wait_for(
        lambda: CONFIG_COPIED not in config_files(container), timeout=10, message="flag dropped"
    )
    environ = container.exec_run(["cat", "/proc/1/environ"]).output.split(b"\0")
    assert b"GREETING=hi" in environ
    assert f"WORKSPACE_ID={workspace_id}".encode() in environ

    # Restart: a new cycle, the same single container name, never two.
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    restarted = wait_api_status(api, workspace_id, S.ONLINE, after_generation=online["generation"])
    container = running_container(docker_engine, workspace_id)
    assert container.labels[_label("generation")] == str(restarted["generation"])

    # Empty the config volume behind the platform's back (through the engine), then restart:
    # the new container's creation refills it from the template's config image, and the agent's
    # registration says so (DOCKER_CONFIG_DELIVERY=image, the default).
    mount = settings.DOCKER_CONFIG_MOUNT
    emptied = container.exec_run(["sh", "-c", f"rm -rf {mount}/* {mount}/.[!.]*"])
    assert emptied.exit_code == 0, emptied.output
    assert config_files(container) == set()
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    recovered = wait_api_status(
        api, workspace_id, S.ONLINE, after_generation=restarted["generation"]
    )
    container = running_container(docker_engine, workspace_id)
    assert {CONFIG_MARKER, "profile.sh"} <= config_files(container)
    wait_for(
        lambda: CONFIG_COPIED not in config_files(container), timeout=10, message="flag dropped"
    )
    recoveries = [
        e for e in api_events(api, workspace_id) if e["type"] == EventType.CONFIG_RECOVERED
    ]
    assert len(recoveries) == 1
    assert recoveries[0]["generation"] == recovered["generation"]
    assert recoveries[0]["payload"] == {"template": "shell-default", "fallback": False}
    assert recoveries[0]["source"] == "agent"  # reported by the agent that found the copy

    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    removed = wait_api_status(api, workspace_id, S.REMOVED)
    assert removed["is_running"] is False
    assert docker_containers(docker_engine, workspace_id) == []
    assert docker_engine.volumes.list(filters={"name": f"ws-{workspace_id}-configs"}) == []

    types = [event["type"] for event in api_events(api, workspace_id)]
    assert types.count(EventType.ONLINE) == 3
    assert types[-1] == EventType.REMOVED
    assert EventType.PROVISION_FAILED not in types


def test_docker_leftover_container_is_replaced_not_a_conflict(
    api, on_docker, docker_engine, platform_url
) -> None:
    response = api.post(
        "/api/workspaces/", {"name": "left", "template": "shell-default"}, format="json"
    )
    workspace_id = response.json()["id"]
    online = wait_api_status(api, workspace_id, S.ONLINE)
    assert api.post(f"/api/workspaces/{workspace_id}/stop/").status_code == 202
    wait_api_status(api, workspace_id, S.STOPPED)

    # What a worker killed mid-cycle leaves behind: a running container under the workspace's
    # fixed name, from an older generation, that the database knows nothing about.
    for container in docker_containers(docker_engine, workspace_id):
        container.remove(force=True)
    leftover = docker_engine.containers.run(
        settings.DOCKER_AGENT_IMAGE,
        entrypoint=["sleep", "600"],
        name=f"ws-{workspace_id}",
        labels={
            _label("platform"): settings.PLATFORM_ID,
            _label("workspace-id"): workspace_id,
            _label("generation"): str(online["generation"]),
        },
        detach=True,
    )

    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202
    started = wait_api_status(api, workspace_id, S.ONLINE, after_generation=online["generation"])
    container = running_container(docker_engine, workspace_id)
    assert container.id != leftover.id
    assert container.labels[_label("generation")] == str(started["generation"])
    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    wait_api_status(api, workspace_id, S.REMOVED)
    assert docker_containers(docker_engine, workspace_id) == []


def test_docker_restart_burst_ends_with_one_container_and_no_conflict(
    api, on_docker, docker_engine, platform_url
) -> None:
    response = api.post(
        "/api/workspaces/", {"name": "burst", "template": "shell-default"}, format="json"
    )
    workspace_id = response.json()["id"]
    online = wait_api_status(api, workspace_id, S.ONLINE)
    # Restart requests race the worker's three processes; the gate serialises the cycles and
    # every cycle replaces the container under the same name.
    for _ in range(6):
        assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202

    def settled() -> dict | None:
        body = api_workspace(api, workspace_id)
        assert body["status"] != S.FAILED, body
        ws = Workspace.objects.get(id=workspace_id)
        done = body["status"] == S.ONLINE and not ws.has_pending_intent
        return body if done and body["generation"] > online["generation"] else None

    final = wait_for(settled, timeout=90, message="the restart burst to settle")
    container = running_container(docker_engine, workspace_id)
    assert container.labels[_label("generation")] == str(final["generation"])
    assert len(docker_engine.volumes.list(filters={"name": f"ws-{workspace_id}-configs"})) == 1
    types = [event["type"] for event in api_events(api, workspace_id)]
    assert EventType.PROVISION_FAILED not in types
    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    wait_api_status(api, workspace_id, S.REMOVED)
