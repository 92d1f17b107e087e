"""Open event streams do not starve requests: /healthz and a workspace list with 200 SSE streams
open, against the same server idle, in one run (ratio = with streams / idle).

Server: the Procfile's web command (gunicorn, uvicorn workers, ``project.asgi``), 2 workers.
The 200 streams belong to 20 users (10 each, the default per-user cap) and stay
open while the requests are timed. For contrast the same probe is sent to the previous server
(gunicorn ``gthread``, 2 workers x 4 threads, ``project.wsgi``) with the same streams open: there
every stream held a thread, so the probe times out (reported as answered / sent)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import Figure, get_latencies, percentile, print_figures, setup_django, shell_rows
from bench.stack import wait_healthz

STREAMS = 200
USERS = 20
ROWS_PER_USER = 50
REQUESTS = 100
REPO = Path(__file__).resolve().parent.parent
ASGI = [
    "project.asgi:application",
    "--worker-class",
    "uvicorn_worker.UvicornWorker",
    "--workers",
    "2",
]
GTHREAD = ["project.wsgi", "--workers", "2", "--threads", "4"]
QUIET = ["--log-level", "warning", "--graceful-timeout", "2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed() -> list[str]:
    from django.contrib.auth import get_user_model

    from workspaces import services
    from workspaces.models import ApiToken, Workspace

    tokens = []
    for index in range(USERS):
        user, _ = get_user_model().objects.get_or_create(username=f"bench-streams-{index}")
        if Workspace.objects.filter(owner=user).count() != ROWS_PER_USER:
            Workspace.objects.filter(owner=user).delete()
            shell_rows(user, [f"s-{row}" for row in range(ROWS_PER_USER)], handled_seq=1)
        ApiToken.objects.filter(user=user).delete()
        tokens.append(services.issue_api_token(user))
    return tokens


@contextmanager
def _server(args: list[str]) -> Iterator[int]:
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *args, "--bind", f"127.0.0.1:{port}", *QUIET],
        cwd=REPO,
        env=env,
    )
    try:
        wait_healthz(port)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _open_streams(port: int, tokens: list[str], wait_open: bool) -> list[socket.socket]:
    """STREAMS raw connections holding GET /api/events/stream open (10 per user)."""
    sockets = []
    for index in range(STREAMS):
        token = tokens[index % len(tokens)]
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            f"GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        sockets.append(sock)
    if wait_open:
        for sock in sockets:
            head = b""
            while b"stream open" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise RuntimeError("a stream closed before it opened")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"stream refused: {head[:80]!r}")
    return sockets


def _latencies(port: int, path: str, token: str | None) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        return get_latencies(conn, path, token, REQUESTS)
    finally:
        conn.close()


def _forget_stream_places() -> None:
    """The previous server was stopped with streams open: their places in the per-user cap
    would only lapse after the lease. Start the next server with a clean count."""
    from django.conf import settings

    from workspaces.redis_client import get_redis

    client = get_redis()
    for key in client.scan_iter(f"{settings.EVENTS_CHANNEL_PREFIX}:streams:*"):
        client.delete(key)


def _gthread_probe(tokens: list[str]) -> tuple[int, int]:
    """(answered, sent) /healthz probes within 5 s each on gthread with the streams open."""
    _forget_stream_places()
    with _server(GTHREAD) as port:
        sockets = _open_streams(port, tokens, wait_open=False)
        # gthread serves 8 of them (2 workers x 4 threads); the others wait for a thread. The
        # first one must be a stream, not a refusal, for the probe to mean anything.
        sockets[0].settimeout(10)
        head = sockets[0].recv(4096)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"gthread stream refused: {head[:80]!r}")
        time.sleep(2)
        answered = 0
        for _ in range(3):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                answered += 1
            except OSError:
                pass
        for sock in sockets:
            sock.close()
        return answered, 3


def run(repeats: int) -> list[Figure]:
    setup_django("workspaces_bench_streams", redis_db=12)
    tokens = _seed()
    _forget_stream_places()
    names = ["/healthz p50", "/healthz p95", "list p50", "list p95"]
    idle: dict[str, list[float]] = {name: [] for name in names}
    busy: dict[str, list[float]] = {name: [] for name in names}

    def measure(port: int, into: dict[str, list[float]]) -> None:
        health = _latencies(port, "/healthz", None)
        listing = _latencies(port, "/api/workspaces/?page_size=50", tokens[0])
        into["/healthz p50"].append(percentile(health, 0.5) * 1000)
        into["/healthz p95"].append(percentile(health, 0.95) * 1000)
        into["list p50"].append(percentile(listing, 0.5) * 1000)
        into["list p95"].append(percentile(listing, 0.95) * 1000)

    with _server(ASGI) as port:
        _latencies(port, "/api/workspaces/", tokens[0])  # warm up both workers
        for repeat in range(repeats):
            # Alternate which goes first, so drift in the machine's load hits both alike.
            order = ("idle", "busy") if repeat % 2 == 0 else ("busy", "idle")
            for phase in order:
                if phase == "idle":
                    measure(port, idle)
                else:
                    sockets = _open_streams(port, tokens, wait_open=True)
                    try:
                        measure(port, busy)
                    finally:
                        for sock in sockets:
                            sock.close()
                    time.sleep(1)  # let the server notice the closed streams
    answered, sent = _gthread_probe(tokens)
    figures = []
    for name in names:
        figures.append(
            Figure(
                name=f"{name} with {STREAMS} streams open",
                unit="ms",
                samples=busy[name],
                floor_name=f"{name} idle, same server",
                floor_samples=idle[name],
                notes=(
                    f"gunicorn + uvicorn workers (project.asgi), 2 workers; "
                    f"previous server (gthread 2x4) with the same streams open: "
                    f"{answered}/{sent} /healthz answered within 5 s"
                )
                if name == "/healthz p50"
                else "",
                extra={"gthread_answered": answered, "gthread_sent": sent},
            )
        )
    return figures


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
