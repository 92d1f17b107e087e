"""The registry listener (project/registry_asgi.py) as a real process: the agent endpoints and
nothing else, whatever the path's disguise or the Host header."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.provisioning.test_reconciler import make_row
from tests.support import RegistryListener
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import EventType, WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _status(url: str, method: str = "GET", host: str | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    request.add_header("Content-Type", "application/json")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_registry_listener_serves_only_the_agent_endpoints(
    registry_listener: RegistryListener,
) -> None:
    base = registry_listener.url
    for path in ["/api/workspaces/", "/admin/", "/api/docs/", "/healthz", "/api/schema/"]:
        assert _status(f"{base}{path}") == 404, path
    # The agent endpoint is served (and wants its bearer token), whatever Host the agent used:
    # on Docker it calls its network's gateway address.
    assert _status(f"{base}/api/registry/heartbeat", "POST") == 401
    assert _status(f"{base}/api/registry/heartbeat", "POST", host="172.30.0.1:8001") == 401
    # A dot-dot path is judged after normalisation (sent raw: urllib would not touch it, but
    # http.client is explicit about it).
    connection = http.client.HTTPConnection("127.0.0.1", registry_listener.port, timeout=5)
    connection.request("GET", "/api/registry/../workspaces/")
    assert connection.getresponse().status == 404
    connection.close()


def _beat(base: str, token: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"{base}/api/registry/heartbeat", method="POST", data=json.dumps(body).encode()
    )
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def test_the_listener_records_heartbeats_on_both_of_its_paths(
    registry_listener: RegistryListener, user: Any
) -> None:
    """A common beat (the listener's one statement) and a status change (the view), over HTTP
    to the real listener, one after the other on its database connections."""
    workspace = make_row(user, WorkspaceStatus.ONLINE)
    token = services.issue_agent_token(workspace.id, workspace.generation)
    body: dict[str, object] = {"workspace_id": str(workspace.id)}
    for healthy, status in ((True, "online"), (False, "degraded"), (True, "online")) * 2:
        answer = _beat(registry_listener.url, token, {**body, "healthy": healthy})
        assert answer == (200, {**body, "status": status, "generation": 1}), answer
    stored = Workspace.objects.get(id=workspace.id)
    assert stored.status == WorkspaceStatus.ONLINE and stored.last_heartbeat_at is not None
    assert stored.events.filter(type=EventType.DEGRADED).count() == 2
    assert _beat(registry_listener.url, "x" * 43, body)[0] == 401


def test_clients_that_stall_hold_nothing_the_agents_need(
    worker_env: dict[str, str], user: Any
) -> None:
    """A workspace reaches this port: connections that send nothing, half a request's headers,
    or headers without their body (an agent stopped mid-call does that too) must not keep the
    agents' calls from being answered. Behind gunicorn's threads, six of them stopped every
    heartbeat; here they cost the event loop a socket each, and a body that does not arrive
    within REQUEST_BODY_SECONDS is answered 408."""
    import socket
    import time

    listener = RegistryListener({**worker_env, "REQUEST_BODY_SECONDS": "2"}).start()
    stalled: list[socket.socket] = []
    try:
        for _ in range(20):
            stalled.append(socket.create_connection(("127.0.0.1", listener.port)))
            half = socket.create_connection(("127.0.0.1", listener.port))
            half.sendall(b"POST /api/registry/heartbeat HTTP/1.1\r\nHost: x\r\n")
            stalled.append(half)
            bodiless = socket.create_connection(("127.0.0.1", listener.port))
            bodiless.sendall(
                b"POST /api/registry/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n"
            )
            stalled.append(bodiless)
        workspace = make_row(user, WorkspaceStatus.ONLINE)
        token = services.issue_agent_token(workspace.id, workspace.generation)
        body: dict[str, object] = {"workspace_id": str(workspace.id)}
        for _ in range(10):  # more calls than the listener has threads
            assert _beat(listener.url, token, body) == (
                200,
                {**body, "status": "online", "generation": 1},
            )
        bodiless = stalled[2]
        bodiless.settimeout(10)
        started = time.monotonic()
        answer = ""
        while "within" not in answer and (chunk := bodiless.recv(4096).decode()):
            answer += chunk
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "within 2 s" in answer
        assert time.monotonic() - started < 5
    finally:
        for connection in stalled:
            connection.close()
        listener.stop()
