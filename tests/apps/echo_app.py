"""A workspace app for the proxy tests (standard library only).

``GET /headers`` answers the request's headers as JSON (what the app sees behind the proxy);
``GET /ws`` is a WebSocket that echoes text frames; anything else is a small page. Listens on
$WORKSPACE_APP_HOST (the platform's word: 127.0.0.1 on the host's network, every address of a
workspace's own namespace):$WORKSPACE_APP_PORT.

Every answer says which workspace's app gave it (``X-Echo-Workspace``: the ``WORKSPACE_ID`` of
its environment; the page and the WebSocket's greeting say it too): a request the proxy sent to
another workspace's app is told apart from one that reached the right app.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IDENTITY_HEADER = "X-Echo-Workspace"
WORKSPACE_ID = os.environ.get("WORKSPACE_ID", "")


def _recv_exact(handler: BaseHTTPRequestHandler, size: int) -> bytes:
    data = handler.rfile.read(size)
    if len(data) != size:
        raise ConnectionError("closed")
    return data


def read_frame(handler: BaseHTTPRequestHandler) -> tuple[int, bytes]:
    first, second = _recv_exact(handler, 2)
    opcode, masked, length = first & 0x0F, second & 0x80, second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _recv_exact(handler, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _recv_exact(handler, 8))
    mask = _recv_exact(handler, 4) if masked else b"\0\0\0\0"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(_recv_exact(handler, length)))
    return opcode, payload


def frame(opcode: int, payload: bytes) -> bytes:
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([len(payload)])
    else:
        header += bytes([126]) + struct.pack("!H", len(payload))
    return header + payload


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
            return
        if self.path == "/headers":
            body = json.dumps(dict(self.headers.items())).encode()
            kind = "application/json"
        else:
            body = (
                "<!doctype html><title>echo app</title>"
                f"<h1>echo app of workspace {WORKSPACE_ID}</h1>"
            ).encode()
            kind = "text/html"
        self.send_response(200)
        self.send_header(IDENTITY_HEADER, WORKSPACE_ID)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _websocket(self) -> None:
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header(IDENTITY_HEADER, WORKSPACE_ID)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        try:
            while True:
                opcode, payload = read_frame(self)
                if opcode == 0x8:
                    self.wfile.write(frame(0x8, b""))
                    return
                self.wfile.write(frame(0x1, f"echo from {WORKSPACE_ID}: ".encode() + payload))
                self.wfile.flush()
        except ConnectionError:
            return
        finally:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(os.environ["WORKSPACE_APP_PORT"])
    host = os.environ.get("WORKSPACE_APP_HOST", "127.0.0.1")
    ThreadingHTTPServer((host, port), Handler).serve_forever()
