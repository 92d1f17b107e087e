"""Event streams under the web server ``bin/run`` starts (gunicorn, uvicorn workers,
``project.asgi``): an open stream holds no thread and no database connection, and the per-user
cap on open streams holds across processes and frees the places of streams that end or whose
process dies.

The server runs with ``DATABASE_POOL_MAX_SIZE=1``: one database connection for the process's
requests. Were a stream to hold it, the requests below would wait for it and be answered 503."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction

from portal import live_events
from tests.portal.test_live_events import StreamReader
from tests.provisioning.test_reconciler import make_row
from tests.support import WebServer, wait_for
from workspaces import services
from workspaces.status import EventSource, EventType, WorkspaceStatus

CAP = 3
LEASE = 3

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _server_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {
        **worker_env,
        "DATABASE_POOL_MAX_SIZE": "1",
        "DATABASE_POOL_TIMEOUT": "5",
        "EVENTS_STREAMS_PER_USER": str(CAP),
        "EVENTS_STREAM_LEASE_SECONDS": str(LEASE),
        "EVENTS_STREAM_KEEPALIVE_SECONDS": "1",
        "LOGS_STREAMS_PER_USER": str(CAP),
        "LOGS_FOLLOW_POLL_MS": "100",
    }


@pytest.fixture
def web(worker_env: dict[str, str]) -> Iterator[WebServer]:
    server = WebServer(_server_env(worker_env), name="web-streams").start()
    yield server
    server.stop()


def _get(server: WebServer, path: str, token: str | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"Token {token}"} if token else {}
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    payload = (
        json.loads(body)
        if response.getheader("Content-Type", "").startswith("application/json")
        else body
    )
    # Header names are case-insensitive (servers may send them lower-case): compared lower-case.
    headers = {name.lower(): value for name, value in response.getheaders()}
    return response.status, headers, payload


def test_open_streams_do_not_block_requests(web, make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice_key, bob_key = services.issue_api_token(alice), services.issue_api_token(bob)
    workspace = make_row(alice, WorkspaceStatus.ONLINE, backend="process")
    streams = [StreamReader(web.url, alice_key) for _ in range(CAP)]
    streams += [StreamReader(web.url, bob_key) for _ in range(CAP)]
    try:
        # Six streams open on a server with one database connection: requests are still answered.
        assert _get(web, "/healthz")[0] == 200
        status, _, listing = _get(web, "/api/workspaces/", alice_key)
        assert status == 200
        assert [row["id"] for row in listing["results"]] == [str(workspace.id)]
        assert _get(web, f"/api/workspaces/{workspace.id}/", alice_key)[0] == 200

        # And the streams are live: a committed event reaches every stream of its owner only.
        with transaction.atomic():
            event = services.record_event(workspace.id, EventType.DEGRADED, EventSource.AGENT, 1)
        for stream in streams[:CAP]:
            stream.wait_for_event(lambda e: e["id"] == event.id)
        assert all(stream.events.empty() and not stream.received for stream in streams[CAP:]), (
            "bob's streams heard alice's event"
        )
    finally:
        for stream in streams:
            stream.close()

    # Resuming replays from the database on this server too.
    resumed = StreamReader(web.url, alice_key, last_event_id=event.id - 1)
    try:
        assert resumed.wait_for_event(lambda e: e["id"] == event.id)["type"] == EventType.DEGRADED
    finally:
        resumed.close()


def test_cap_per_user_answers_429_and_frees_a_place_when_a_stream_ends(web, make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice_key = services.issue_api_token(alice)
    streams = [StreamReader(web.url, alice_key) for _ in range(CAP)]
    try:
        status, headers, body = _get(web, "/api/events/stream", alice_key)
        assert status == 429
        assert int(headers["retry-after"]) >= 1
        assert "at most 3" in body["detail"]
        assert live_events.open_streams(alice.pk) == CAP
        # The cap is per user: bob is not affected.
        other = StreamReader(web.url, services.issue_api_token(bob))
        other.close()

        streams.pop().close()
        # The server notices the client left (at the next keepalive) and gives the place back.
        wait_for(lambda: live_events.open_streams(alice.pk) == CAP - 1, message="a place freed")
        streams.append(StreamReader(web.url, alice_key))
    finally:
        for stream in streams:
            stream.close()
    wait_for(lambda: live_events.open_streams(alice.pk) == 0, message="every place freed")


def test_cap_holds_across_processes_and_a_dead_process_frees_its_places(
    web, worker_env, make_user
) -> None:
    alice = make_user("alice")
    alice_key = services.issue_api_token(alice)
    other = WebServer(_server_env(worker_env), name="web-streams-2").start()
    try:
        held = [StreamReader(other.url, alice_key) for _ in range(CAP)]
        # Three streams on another process count here too.
        assert _get(web, "/api/events/stream", alice_key)[0] == 429
        other.kill()  # no clean-up runs: the places are freed by their leases running out
        for stream in held:
            stream.close()
    finally:
        other.stop()
    wait_for(
        lambda: live_events.open_streams(alice.pk) == 0,
        timeout=LEASE * 10,
        message="the dead process's places to lapse",
    )
    stream = StreamReader(web.url, alice_key)
    stream.close()


class LogStreamReader:
    """A real HTTP client holding a workspace's ``logs/stream/`` open, collecting its frames
    (event type, data) in a thread."""

    def __init__(self, server: WebServer, token: str, workspace_id: Any, tail: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.conn.request(
            "GET",
            f"/api/workspaces/{workspace_id}/logs/stream/?tail={tail}",
            headers={"Authorization": f"Token {token}", "Accept": "text/event-stream"},
        )
        self.sock = self.conn.sock  # http.client may drop its reference while reading
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        event, data = "message", None
        try:
            while raw := self.response.readline():
                line = raw.decode().rstrip("\n")
                if not line:
                    if data is not None:
                        self.frames.append((event, data))
                    event, data = "message", None
                elif line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
        except (OSError, ValueError, AttributeError):  # closed under the reader
            return

    def lines(self) -> list[str]:
        return [data["line"] for event, data in list(self.frames) if event == "message"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.thread.join(timeout=10)


def test_open_log_streams_hold_no_request_thread(web, make_user) -> None:
    """More log streams than database connections, each following a file a real process appends to:
    requests are still answered, and every stream gets the new lines."""
    alice = make_user("alice")
    key = services.issue_api_token(alice)
    workspace = make_row(alice, WorkspaceStatus.ONLINE, backend="process")
    folder = Path(settings.WORKSPACE_DATA_DIR) / str(workspace.id)
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "agent.log"
    output.write_text("".join(f"old {n}\n" for n in range(10)))
    streams = [LogStreamReader(web, key, workspace.id, tail=2) for _ in range(CAP)]
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "with open(sys.argv[1], 'a') as out:\n"
            "    for n in range(10_000):\n"
            "        print('new', n, file=out, flush=True); time.sleep(0.1)\n",
            str(output),
        ]
    )
    try:
        for stream in streams:
            wait_for(partial(lambda s: s.lines()[:2] == ["old 8", "old 9"], stream), message="tail")
        assert _get(web, "/healthz")[0] == 200
        assert _get(web, f"/api/workspaces/{workspace.id}/", key)[0] == 200
        for stream in streams:
            wait_for(partial(lambda s: "new 3" in s.lines(), stream), message="new lines")
            assert s_new(stream)[:4] == ["new 0", "new 1", "new 2", "new 3"]
        status, _, body = _get(web, f"/api/workspaces/{workspace.id}/logs/stream/", key)
        assert status == 429 and "log streams" in body["detail"]
    finally:
        writer.kill()
        writer.wait()
        for stream in streams:
            stream.close()
    wait_for(lambda: live_events.open_streams(alice.pk, "log") == 0, message="places freed")


def s_new(stream: LogStreamReader) -> list[str]:
    return [line for line in stream.lines() if line.startswith("new ")]


def test_a_request_that_stalls_mid_body_holds_no_request_thread(worker_env, make_user) -> None:
    """With one thread for ordinary requests, clients that send headers and then stall (a body
    announced and never sent) leave it free: the event loop reads a request whole before the
    thread gets it, and answers 408 when the body is late."""
    server = WebServer(
        {**_server_env(worker_env), "REQUEST_BODY_SECONDS": "2"}, name="web-stalls"
    ).start()
    token = services.issue_api_token(make_user("stalled"))
    stalled: list[socket.socket] = []
    try:
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(
                b"POST /api/workspaces/ HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nAuthorization: Token "
                + token.encode()
                + b"\r\nContent-Length: 60\r\n\r\n{"
            )
            stalled.append(client)
        status, _, body = _get(server, "/api/workspaces/", token)
        assert status == 200, body
        client = stalled[0]
        client.settimeout(10)
        answer = b""
        while b"within" not in answer and (chunk := client.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for client in stalled:
            client.close()
        server.stop()
