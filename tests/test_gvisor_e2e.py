"""Docker workspaces under the engine's gVisor runtime (a template's ``sandbox: gvisor``), end to
end: a real engine with runsc registered, the Docker worker, real agents inside the sandbox.

* the whole life of a workspace works in the sandbox (registration, heartbeats, the app through
  the proxy, logs, restart, config recovery, idle stop, removal), and it runs on gVisor's kernel;
* a kernel call answered by gVisor's own kernel is refused by the host's under runc;
* a start that cannot have its sandbox fails at once, at preflight, naming it: an engine without
  the runtime, and the process and Swarm backends, which have no runtime to choose.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings
from django.utils import timezone

from provisioning import lifecycle
from provisioning.backends import reset_backends
from provisioning.backends.base import CONFIG_MARKER
from provisioning.idle import sweep_idle
from tests.support import api_events, docker_containers, wait_api_status, wait_for
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("use_session_templates"),
]
S = WorkspaceStatus
DEFAULT_PAGE = "Your workspace is running"
# gVisor's kernel answers uname with its own release, whatever the host runs.
GVISOR_RELEASE = "4.4.0"


def wait_status(api: Any, workspace_id: str, status: S, *, after_generation: int = 0) -> dict:
    # A sandbox starts slower than runc: a longer wait than the other end-to-end tests'.
    return wait_api_status(api, workspace_id, status, after_generation=after_generation, timeout=90)


def running_container(engine: Any, workspace_id: str) -> Any:
    [container] = docker_containers(engine, workspace_id)
    assert container.status == "running"
    return container


def run(container: Any, command: str) -> tuple[int, str]:
    result = container.exec_run(["sh", "-c", command])
    return result.exit_code, result.output.decode(errors="replace").strip()


def via_proxy(url: str, token: str) -> requests.Response:
    """GET the workspace's url through Caddy (the host name need not resolve)."""
    headers = {"Host": urlsplit(url).netloc, "Authorization": f"Token {token}"}
    return requests.get(f"http://{settings.PROXY_BIND}/", headers=headers, timeout=15)


def config_files(container: Any) -> set[str]:
    code, output = run(container, f"ls -A {settings.DOCKER_CONFIG_MOUNT}")
    assert code == 0, output
    return set(output.split())


def test_a_gvisor_workspace_lives_its_whole_life_in_the_sandbox(
    api, user, on_docker, gvisor_engine, caddy, platform_url, settings
) -> None:
    response = api.post(
        "/api/workspaces/",
        {"name": "sandboxed", "template": "shell-gvisor", "env": {"GREETING": "hi"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["sandbox"] == "gvisor"
    workspace_id = response.json()["id"]
    online = wait_status(api, workspace_id, S.ONLINE)
    assert online["sandbox"] == "gvisor"
    container = running_container(gvisor_engine, workspace_id)
    host_config = container.attrs["HostConfig"]
    assert host_config["Runtime"] == settings.DOCKER_GVISOR_RUNTIME
    # The sandbox's own threads count against the engine's pids limit: gVisor's limit applies.
    assert host_config["PidsLimit"] == settings.DOCKER_GVISOR_PIDS
    # The kernel the workspace talks to is gVisor's, not the host's.
    assert run(container, "uname -r") == (0, GVISOR_RELEASE)
    assert os.uname().release != GVISOR_RELEASE
    assert b"GREETING=hi" in container.exec_run(["cat", "/proc/1/environ"]).output

    # Heartbeats arrive (the agent's HTTP goes through nc in the sandbox: agent.sh).
    beat = Workspace.objects.get(id=workspace_id).last_heartbeat_at
    assert beat is not None
    wait_for(
        lambda: (Workspace.objects.get(id=workspace_id).last_heartbeat_at or beat) > beat,
        timeout=20,
        message="a later heartbeat",
    )
    # The app through the proxy, and the workspace's logs.
    assert online["url"]
    answer = via_proxy(online["url"], services.issue_api_token(user))
    assert answer.status_code == 200 and DEFAULT_PAGE in answer.text, answer.text
    lines = api.get(f"/api/workspaces/{workspace_id}/logs/?tail=100").json()["lines"]
    assert any(f"registered workspace {workspace_id}" in line for line in lines), lines

    # Restart: a new container, under gVisor again.
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    restarted = wait_status(api, workspace_id, S.ONLINE, after_generation=online["generation"])
    container = running_container(gvisor_engine, workspace_id)
    assert container.attrs["HostConfig"]["Runtime"] == settings.DOCKER_GVISOR_RUNTIME

    # Config recovery: the volume emptied from inside, a restart refills it, the agent says so.
    mount = settings.DOCKER_CONFIG_MOUNT
    assert run(container, f"rm -rf {mount}/* {mount}/.[!.]*")[0] == 0
    assert config_files(container) == set()
    assert api.post(f"/api/workspaces/{workspace_id}/restart/").status_code == 202
    recovered = wait_status(api, workspace_id, S.ONLINE, after_generation=restarted["generation"])
    container = running_container(gvisor_engine, workspace_id)
    assert CONFIG_MARKER in config_files(container)  # copied again from the config image
    recoveries = [
        e for e in api_events(api, workspace_id) if e["type"] == EventType.CONFIG_RECOVERED
    ]
    assert [(e["generation"], e["source"]) for e in recoveries] == [
        (recovered["generation"], "agent")
    ]

    # Idle stop: the sweep (as beat runs it, here in this process) finds it idle past the
    # platform's timeout (the template sets none), an hour from now.
    settings.IDLE_TIMEOUT_SECONDS = 3600
    report = sweep_idle(now=timezone.now() + timedelta(seconds=3601))
    assert report.scanned >= 1
    wait_for(
        lambda: Workspace.objects.get(id=workspace_id).status == S.STOPPED,
        timeout=60,
        message="stopped for idling",
    )
    [stopped] = [e for e in api_events(api, workspace_id) if e["type"] == EventType.STOPPED]
    assert stopped["payload"]["policy"] == "idle_timeout"
    assert all(c.status != "running" for c in docker_containers(gvisor_engine, workspace_id))

    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    wait_status(api, workspace_id, S.REMOVED)
    assert docker_containers(gvisor_engine, workspace_id) == []
    assert EventType.PROVISION_FAILED not in [e["type"] for e in api_events(api, workspace_id)]


def test_the_kernel_log_is_gvisors_own_where_the_host_refuses_it(
    api, user, on_docker, gvisor_engine
) -> None:
    """syslog(2) (busybox dmesg): under runc the host's kernel refuses an unprivileged process
    its log (no CAP_SYSLOG, dmesg_restrict); under gVisor the call never reaches the host: the
    sandbox's kernel answers with its own boot log, which starts "Starting gVisor..." (as gVisor
    documents), and the host's log is not in it."""
    runc = services.create_workspace(owner=user, name="plain", template="shell-default")
    gvisor = services.create_workspace(owner=user, name="boxed", template="shell-gvisor")
    answers = {}
    for workspace in (runc, gvisor):
        wait_status(api, str(workspace.id), S.ONLINE)
        container = running_container(gvisor_engine, str(workspace.id))
        answers[workspace.sandbox] = (run(container, "dmesg"), run(container, "uname -r")[1])
    (code, text), release = answers["runc"]
    assert "Starting gVisor" not in text
    if Path("/proc/sys/kernel/dmesg_restrict").read_text().strip() == "1":  # Debian's default
        assert code != 0 and "Operation not permitted" in text, text
    assert release == os.uname().release
    (code, text), release = answers["gvisor"]
    assert code == 0 and "Starting gVisor" in text, text
    assert release == GVISOR_RELEASE


def test_an_engine_without_the_runtime_fails_the_start_at_preflight_naming_it(
    user, docker_engine, settings
) -> None:
    """The runtime's name is a setting: a name the engine has not registered fails the first
    cycle at once (the real selector and lifecycle, in this process, on the real engine): one
    preflight event naming the runtime, no container, no fallback to runc."""
    missing = "runsc-not-registered"
    settings.WORKSPACE_BACKEND = "docker"
    settings.DOCKER_GVISOR_RUNTIME = missing
    reset_backends()
    try:
        workspace = services.create_workspace(owner=user, name="nogv", template="shell-gvisor")
        assert lifecycle.converge(workspace.id) == ["provision"]
    finally:
        reset_backends()
    row = Workspace.objects.get(id=workspace.id)
    assert row.status == S.FAILED and not row.is_running
    assert missing in row.last_error and "gvisor" in row.last_error
    [event] = row.events.filter(type=EventType.PROVISION_FAILED)
    assert event.source == EventSource.PREFLIGHT
    assert event.payload["sandbox"] == "gvisor"
    assert event.payload["container_runtime"] == missing
    assert docker_containers(docker_engine, str(workspace.id)) == []
    assert lifecycle.converge(workspace.id) == []  # final: nothing retries it
