"""Two nodes: the session's manager and a second private engine joined as a worker (advertising
on its own loopback address, its gateway bridge made first). Workspaces land on the node their
template's placement names; a node that goes down is detected by the reconciler (its workspaces
offline, the node named) and a workspace started again is placed on the node that is left."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning import gate
from provisioning.backends.agent_image import build_agent_image
from provisioning.backends.engine import workspace_filter
from provisioning.reconciler import reconcile_once
from tests.support import wait_for
from tests.swarm.conftest import Swarm
from tests.swarm.test_swarm_e2e import _create, _objects, _wait
from tests.swarm_support import Engine, free_loopback
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]
S = WorkspaceStatus


@pytest.fixture
def second_node(swarm: Swarm) -> Iterator[Engine]:
    if swarm.manager is None:
        pytest.fail("the two-node test joins a private engine to the session's private manager")
    manager = swarm.manager
    node = Engine(free_loopback({manager.address})).start()
    try:
        node.join(manager, manager.docker("swarm", "join-token", "-q", "worker"))
        build_agent_image(host=node.host)  # a swarm never pulls: the image on every node
        manager.docker("node", "update", "--label-add", "ws-zone=a", manager.node_id())
        manager.docker("node", "update", "--label-add", "ws-zone=b", node.node_id())
        yield node
    finally:
        node_id = node.node_id() if node.proc and node.proc.poll() is None else ""
        node.stop()
        for leftover in [node_id] if node_id else manager.docker("node", "ls", "-q").split():
            if leftover != manager.node_id():
                manager.docker("node", "rm", "--force", leftover, check=False)


def _node_of(swarm: Swarm, workspace_id: str) -> str:
    tasks = swarm.client.api.tasks(
        filters={"label": workspace_filter(workspace_id), "desired-state": "running"}
    )
    assert len(tasks) == 1, tasks
    return str(tasks[0]["NodeID"])


def test_placement_by_node_and_a_node_that_goes_down(
    api, on_swarm, swarm, second_node, docker_worker
) -> None:
    manager = swarm.manager
    assert manager is not None
    manager_id, node_id = manager.node_id(), second_node.node_id()

    on_a = _create(api, "zone-a", template="swarm-zone-a")
    on_b = _create(api, "zone-b", template="swarm-zone-b")
    _wait(on_a, S.ONLINE)
    _wait(on_b, S.ONLINE)  # its agent, on the second node, registered
    assert _node_of(swarm, on_a) == manager_id
    assert _node_of(swarm, on_b) == node_id

    # An unconstrained workspace placed on the second node: the manager paused meanwhile (a
    # paused node takes no new task and keeps its own; draining would shut zone-a's down).
    manager.docker("node", "update", "--availability", "pause", manager_id)
    try:
        anywhere = _create(api, "anywhere")
        _wait(anywhere, S.ONLINE)
    finally:
        manager.docker("node", "update", "--availability", "active", manager_id)
    assert _node_of(swarm, anywhere) == node_id
    for workspace_id in (on_a, on_b, anywhere):
        wait_for(lambda w=workspace_id: not gate.is_held(w), message="gate released")  # type: ignore[misc]

    second_node.stop()  # the node goes away; its tasks still look running to the manager

    def node_down() -> bool:
        node = swarm.client.api.inspect_node(node_id)
        return bool(node["Status"]["State"] != "ready")

    wait_for(node_down, timeout=120, message="the manager to see the node down")
    report = reconcile_once()

    for workspace_id in (on_b, anywhere):
        row = Workspace.objects.get(id=workspace_id)
        assert (row.status, row.is_running) == (S.OFFLINE, False), row.last_error
        [event] = WorkspaceEvent.objects.filter(workspace=row, source=EventSource.RECONCILER)
        assert event.type == EventType.OFFLINE
        # The node is named: "on node <hostname> (<address seen>, <id>), which is down".
        assert f", {node_id[:12]}), which is down" in event.payload["detail"]
    assert Workspace.objects.get(id=on_a).status == S.ONLINE
    assert report.backend_calls["swarm.list_instances"] == 1

    # Started again, the unconstrained workspace is placed on the node that is left.
    generation = Workspace.objects.get(id=anywhere).generation
    assert api.post(f"/api/workspaces/{anywhere}/start/").status_code == 202
    _wait(anywhere, S.ONLINE, after_generation=generation)
    assert _node_of(swarm, anywhere) == manager_id

    for workspace_id in (on_a, on_b, anywhere):
        assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202
    for workspace_id in (on_a, on_b, anywhere):
        _wait(workspace_id, S.REMOVED)
        assert _objects(swarm, workspace_id)["services"] == []
