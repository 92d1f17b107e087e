"""The registry listener (project/registry_wsgi.py) as a real process: the agent endpoints and
nothing else, whatever the path's disguise or the Host header."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request

import pytest

from tests.support import RegistryListener

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
