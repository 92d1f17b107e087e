"""The Python agent's HTTP on plain sockets: its calls to the platform, its app check and its
default page, against real servers on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from provisioning.agent import AGENT_PAGE, workspace_agent


@contextmanager
def _raw_server(answer: Callable[[socket.socket, bytes], None]) -> Iterator[int]:
    """A server that reads one request per connection and lets ``answer`` reply (and keep the
    connection open if it wants to)."""
    listener = socket.create_server(("127.0.0.1", 0))
    kept: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            answer(connection, request)
            kept.append(connection)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for connection in kept:
            connection.close()


def test_the_json_it_sends_is_json() -> None:
    body: dict[str, str | bool] = {
        "workspace_id": 'a"b\\c\n\x01é',
        "healthy": True,
        "active": False,
    }
    assert json.loads(workspace_agent._json(body)) == body


def test_the_platform_url_may_carry_a_path_and_an_ipv6_host() -> None:
    assert workspace_agent._split_url("http://[::1]:8001/base/api/x") == (
        "[::1]:8001",
        "::1",
        8001,
        "/base/api/x",
    )
    assert workspace_agent._split_url("http://platform") == ("platform", "platform", 80, "/")
    with pytest.raises(ValueError):
        workspace_agent._split_url("ftp://platform/")


def test_a_post_carries_the_token_and_the_body_and_returns_the_answer() -> None:
    seen: dict[str, object] = {}

    class Registry(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["path"] = self.path
            seen["authorization"] = self.headers["Authorization"]
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = b'{"detail": "token rejected"}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, text = workspace_agent._post(
            f"http://127.0.0.1:{server.server_address[1]}/api/registry/register",
            "secret",
            {"workspace_id": "w1"},
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (status, text) == (401, '{"detail": "token rejected"}')
    assert seen == {
        "path": "/api/registry/register",
        "authorization": "Bearer secret",
        "body": {"workspace_id": "w1"},
    }


def test_the_app_check_needs_only_the_status_line(monkeypatch) -> None:
    # An app that answers chunked and keeps the connection open despite "Connection: close":
    # the check must not wait for the connection to end (it would time out and say unhealthy).
    def chunked(connection: socket.socket, request: bytes) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")

    with _raw_server(chunked) as port:
        monkeypatch.setenv("WORKSPACE_APP_PORT", str(port))
        began = time.monotonic()
        assert workspace_agent._app_answers()
        assert time.monotonic() - began < 2.5  # the check's own timeout is 3 s

    def failing(connection: socket.socket, request: bytes) -> None:
        connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    with _raw_server(failing) as port:
        monkeypatch.setenv("WORKSPACE_APP_PORT", str(port))
        assert not workspace_agent._app_answers()

    def not_http(connection: socket.socket, request: bytes) -> None:
        connection.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
        connection.close()

    with _raw_server(not_http) as port:
        monkeypatch.setenv("WORKSPACE_APP_PORT", str(port))
        assert not workspace_agent._app_answers()
    # Nothing listens on the port any more.
    assert not workspace_agent._app_answers()


def test_a_chunked_platform_answer_is_read_to_its_last_chunk() -> None:
    def chunked(connection: socket.socket, request: bytes) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )

    with _raw_server(chunked) as port:
        status, text = workspace_agent._post(f"http://127.0.0.1:{port}/x", "t", {})
    assert (status, text) == (200, "2\r\n{}\r\n0\r\n\r\n")


def test_the_default_page_answers_get_and_head_and_refuses_the_rest() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    listener = workspace_agent._page_server(port)
    try:
        status, body = workspace_agent._http(
            "GET", f"http://127.0.0.1:{port}/any/path", headers={}, timeout=5
        )
        assert (status, body) == (200, AGENT_PAGE.read_bytes())
        status, body = workspace_agent._http(
            "HEAD", f"http://127.0.0.1:{port}/", headers={}, timeout=5
        )
        assert (status, body) == (200, b"")
        status, _ = workspace_agent._http(
            "POST", f"http://127.0.0.1:{port}/", headers={}, body=b"x", timeout=5
        )
        assert status == 501
    finally:
        listener.close()
