"""The platform as users run it, for the benchmarks: gunicorn (the API), the registry listener
agents call back (``project.registry_asgi``, bound to every host address so workspaces on their
own Docker networks reach it at their network's gateway), Celery workers, optionally Celery beat
and Caddy as the proxy, a Docker engine, and a bare HTTP endpoint for the floor runs.

Everything started here is a child process of the bench (stopped by its pid when the block ends);
containers carry a per-run ``PLATFORM_ID`` label, so cleanup touches nothing else on the engine.
"""

from __future__ import annotations

import contextlib
import functools
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
# than cores keep the engine busy without thrashing. The web and registry processes as in the
# Procfile (gunicorn with uvicorn workers; the API's WEB_THREADS threads per web worker).
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


def wait_healthz(port: int, timeout: float = 30.0) -> None:
    """Until the web server on ``port`` answers ``GET /healthz`` (any status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            probe.request("GET", "/healthz")
            probe.getresponse().read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def write_proxy_config(env: dict[str, str], path: Path) -> Path:
    """The proxy's whole configuration for a platform run with ``env`` (``manage.py
    proxy_config``, as ``bin/run`` starts Caddy), written to ``path``."""
    printed = subprocess.run(
        [sys.executable, "manage.py", "proxy_config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path.write_text(printed)
    return path


@contextlib.contextmanager
def private_redis(log_dir: Path) -> Iterator[int]:
    """A redis-server of the bench's own on a free loopback port, for the whole run, so that its
    CPU can be counted (the machine's Redis serves other work too). Sets ``REDIS_URL`` for this
    process (before Django is set up) and so for the platform it starts; yields its pid."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            *("redis-server", "--bind", "127.0.0.1", "--port", str(port)),
            *("--save", "", "--appendonly", "no", "--dir", str(log_dir)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {log_dir / 'redis.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_until(answers, 20, "redis-server", interval=0.1)
        os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        yield proc.pid
    finally:
        _stop(proc)
        log.close()


@dataclass
class Platform:
    url: str
    port: int
    token: str
    platform_id: str
    env: dict[str, str]
    log_dir: Path
    # gunicorn (API and registry), Celery worker (and beat) and Caddy main processes
    pids: list[int] = field(default_factory=list)
    # the same processes by part: caddy, registry, web, beat, worker0, ...
    parts: dict[str, int] = field(default_factory=dict)
    # a Redis server of this platform's alone (``private_redis``), when it has one
    redis_pid: int | None = None

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
def platform(
    name: str,
    log_dir: Path,
    backend: str = "docker",
    extra_env: dict[str, str] | None = None,
    *,
    proxy: bool = False,
    beat: bool = False,
    access_log: bool = False,
) -> Iterator[Platform]:
    """gunicorn (API and registry listener) + Celery worker(s) on ``backend`` (the one new
    workspaces are recorded on), with this process's database and Redis, and Debian's Caddy as
    the proxy when ``proxy`` (serving the platform's configuration, as ``bin/run`` starts it);
    ``extra_env`` is added to their environment (say, a Celery queue of their own so
    that two platforms can run side by side). With ``beat``, Celery beat runs too and the workers
    also consume the sweep queue, as the Procfile's worker does (the sweeps, liveness among them,
    then run as in production); with ``access_log``, gunicorn logs every request to its log file,
    as the Procfile's web and registry lines do. Django must be set up (setup_django); on the
    Docker backend, DOCKER_HOST must point at a running engine."""
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from workspaces import services

    user, _ = get_user_model().objects.get_or_create(username=f"bench-{name}")
    token = services.issue_api_token(user)
    port, registry_port, admin_port, proxy_port = free_port(), free_port(), free_port(), free_port()
    platform_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "REDIS_URL": settings.REDIS_URL,
        "WORKSPACE_BACKEND": backend,
        "DOCKER_HOST": str(settings.DOCKER_HOST),
        # Agents call the registry listener; on a workspace network the host part becomes the
        # network's gateway (the backend rewrites it).
        "PLATFORM_URL": f"http://127.0.0.1:{registry_port}",
        "PLATFORM_PUBLIC_URL": url,
        "PROXY_ADMIN": f"127.0.0.1:{admin_port}",
        "PROXY_BIND": f"127.0.0.1:{proxy_port}",
        "PLATFORM_ID": platform_id,
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        # The benchmarks measure cycles, not admission: no quota or cap refuses their batches.
        "WORKSPACE_QUOTA_PER_USER": "0",
        "PROVISIONING_CONCURRENCY_LIMIT": "0",
        # Beat and a sweep worker run only with ``beat``, and the bench pings its own workers
        # below: /readyz answers once the web process reaches PostgreSQL and Redis.
        "READYZ_REQUIRE_WORKERS": "false",
        "WEB_THREADS": str(WEB_THREADS),
        **(extra_env or {}),
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    parts: dict[str, int] = {}

    def spawn(args: list[str], log_name: str, python: bool = True) -> subprocess.Popen[bytes]:
        log = open(log_dir / log_name, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", *args] if python else args,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        parts[log_name.removesuffix(".log")] = proc.pid
        return proc

    try:
        if proxy:
            config = write_proxy_config(env, log_dir / "caddy.json")
            spawn(["caddy", "run", "--config", str(config)], "caddy.log", python=False)
        logged = ["--access-logfile", "-"] if access_log else []
        registry = spawn(
            [
                "gunicorn",
                "project.registry_asgi:application",
                "--worker-class",
                "uvicorn_worker.UvicornWorker",
                "--bind",
                f"0.0.0.0:{registry_port}",
                "--workers",
                "1",
                "--log-level",
                "warning",
                *logged,
            ],
            "registry.log",
        )
        web = spawn(
            [
                "gunicorn",
                "project.asgi:application",
                "--worker-class",
                "uvicorn_worker.UvicornWorker",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(WEB_WORKERS),
                "--log-level",
                "warning",
                *logged,
            ],
            "gunicorn.log",
        )
        queues = env.get("CELERY_LIFECYCLE_QUEUE") or str(settings.CELERY_TASK_DEFAULT_QUEUE)
        if beat:
            queues += f",{settings.CELERY_SWEEP_QUEUE}"
            spawn(
                [
                    "celery",
                    "-A",
                    "project",
                    "beat",
                    "-l",
                    "WARNING",
                    "--schedule",
                    str(log_dir / "celerybeat-schedule"),
                ],
                "beat.log",
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
                    queues,
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

        def registry_ready() -> bool:
            if registry.poll() is not None:
                raise RuntimeError(f"registry exited; see {log_dir / 'registry.log'}")
            try:
                probe = http.client.HTTPConnection("127.0.0.1", registry_port, timeout=2)
                probe.request("GET", "/healthz")
                return probe.getresponse().status == 404  # answers, and only /api/registry/
            except OSError:
                return False

        wait_until(registry_ready, 60, "registry listener", interval=0.2)
        from project.celery import app

        def answers(node: str) -> bool:
            return bool(app.control.ping(destination=[node], timeout=0.5))

        for node in names:
            wait_until(functools.partial(answers, node), 60, f"worker {node}", interval=0.2)
        yield Platform(url, port, token, platform_id, env, log_dir, [p.pid for p in procs], parts)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def remove_labelled(label: str) -> None:
    """Force-remove every container, volume and network carrying ``label`` (key=value), in
    parallel."""
    from provisioning.backends.docker import make_client

    client = make_client()
    try:
        containers = client.containers.list(all=True, filters={"label": label})
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: c.remove(force=True), containers))
        for volume in client.volumes.list(filters={"label": label}):
            with contextlib.suppress(Exception):
                volume.remove(force=True)

        def remove_network(network: Any) -> None:
            with contextlib.suppress(Exception):
                network.remove()

        networks = client.networks.list(filters={"label": label})
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(remove_network, networks))
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
