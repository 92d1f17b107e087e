"""The platform as users run it, for the Docker benchmarks: gunicorn, Celery workers, a Docker
engine, and a bare HTTP endpoint for the floor runs.

Everything started here is a child process of the bench (stopped by its pid when the block ends);
containers carry a per-run ``PLATFORM_ID`` label, so cleanup touches nothing else on the engine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Two cores: the cycle mostly waits on the engine and PostgreSQL, so a few more worker processes
# than cores keep the engine busy without thrashing. Gunicorn as in the Procfile.
WORKER_PROCESSES = int(os.environ.get("BENCH_WORKER_PROCESSES", "1"))
WORKER_CONCURRENCY = int(os.environ.get("BENCH_WORKER_CONCURRENCY", "4"))
WEB_WORKERS = int(os.environ.get("BENCH_WEB_WORKERS", "2"))
WEB_THREADS = int(os.environ.get("BENCH_WEB_THREADS", "4"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class Platform:
    url: str
    port: int
    token: str
    platform_id: str
    env: dict[str, str]
    log_dir: Path
    pids: list[int] = field(default_factory=list)  # gunicorn and Celery worker main processes

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Authorization": f"Token {self.token}"}
            payload = None
            if body is not None:
                payload = json.dumps(body)
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, (json.loads(data) if data else {})
        finally:
            conn.close()


@contextlib.contextmanager
def platform(name: str, log_dir: Path) -> Iterator[Platform]:
    """gunicorn + Celery worker(s) on the Docker backend, with this process's database and Redis.
    Django must be set up (setup_django) and DOCKER_HOST must point at a running engine."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user, _ = get_user_model().objects.get_or_create(username=f"bench-{name}")
    token, _ = Token.objects.get_or_create(user=user)
    port = free_port()
    platform_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "REDIS_URL": settings.REDIS_URL,
        "WORKSPACE_BACKEND": "docker",
        "DOCKER_HOST": str(settings.DOCKER_HOST),
        "PLATFORM_URL": url,
        "PLATFORM_ID": platform_id,
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(log_dir / log_name, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        web = spawn(
            [
                "gunicorn",
                "project.wsgi",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(WEB_WORKERS),
                "--threads",
                str(WEB_THREADS),
                "--log-level",
                "warning",
            ],
            "gunicorn.log",
        )
        names = []
        for index in range(WORKER_PROCESSES):
            node = f"bench{index}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
            names.append(node)
            spawn(
                [
                    "celery",
                    "-A",
                    "project",
                    "worker",
                    "-l",
                    "WARNING",
                    "-P",
                    "prefork",
                    "-c",
                    str(WORKER_CONCURRENCY),
                    "-n",
                    node,
                    "-Q",
                    str(settings.CELERY_TASK_DEFAULT_QUEUE),
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                f"worker{index}.log",
            )

        def web_ready() -> bool:
            if web.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {log_dir / 'gunicorn.log'}")
            try:
                probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                probe.request("GET", "/readyz")
                return probe.getresponse().status == 200
            except OSError:
                return False

        wait_until(web_ready, 60, "gunicorn", interval=0.2)
        from project.celery import app

        for node in names:
            wait_until(
                lambda node=node: app.control.ping(destination=[node], timeout=0.5),
                60,
                f"worker {node}",
                interval=0.2,
            )
        yield Platform(url, port, token.key, platform_id, env, log_dir, [p.pid for p in procs])
    finally:
        for proc in reversed(procs):
            _stop(proc)


def remove_labelled(label: str) -> None:
    """Force-remove every container and volume carrying ``label`` (key=value), in parallel."""
    from provisioning.backends.docker import make_client

    client = make_client()
    try:
        containers = client.containers.list(all=True, filters={"label": label})
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: c.remove(force=True), containers))
        for volume in client.volumes.list(filters={"label": label}):
            with contextlib.suppress(Exception):
                volume.remove(force=True)
    finally:
        client.close()


class BareEndpoint:
    """A tiny threaded HTTP server that answers 200 to every POST and records, per workspace id,
    when its first ``/register`` call arrived: the floor's stand-in for the platform."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_POST(self) -> None:
                arrived = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b"{}"
                if self.path.endswith("/register"):
                    try:
                        workspace_id = str(json.loads(body).get("workspace_id"))
                    except ValueError:
                        workspace_id = ""
                    with endpoint._lock:
                        endpoint.arrivals.setdefault(workspace_id, arrived)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BareEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def arrived(self, workspace_id: str) -> float | None:
        with self._lock:
            return self.arrivals.get(workspace_id)
