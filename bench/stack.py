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

from bench.common import call_json
from project.supervise import parse_procfile

REPO = Path(__file__).resolve().parent.parent

# Two cores: the cycle mostly waits on the engine and PostgreSQL, so a few more worker processes
# than cores keep the engine busy without thrashing. The web and registry processes as in the
# Procfile (gunicorn with uvicorn workers).
WORKER_PROCESSES = int(os.environ.get("BENCH_WORKER_PROCESSES", "1"))
WORKER_CONCURRENCY = int(os.environ.get("BENCH_WORKER_CONCURRENCY", "4"))
WEB_WORKERS = int(os.environ.get("BENCH_WEB_WORKERS", "2"))


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


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
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
        stop(proc)
        log.close()


@dataclass
class Platform:
    owner: str  # the user name of the token, who owns the workspaces made through the API
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

    @property
    def label(self) -> str:
        """The label (key=value) of this platform's containers, volumes and networks."""
        return f"{label_key('platform')}={self.platform_id}"

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        return call_json(self.port, method, path, {"Authorization": f"Token {self.token}"}, body)

    def create_workspace(self, name: str, template: str = "shell-default") -> str:
        """``POST /api/workspaces/``: the new workspace's id; any answer but 201 fails."""
        status, body = self.request(
            "POST", "/api/workspaces/", {"name": name, "template": template}
        )
        if status != 201:
            raise RuntimeError(f"POST /api/workspaces/ answered {status}: {body}")
        return str(body["id"])


def procfile_commands() -> dict[str, list[str]]:
    """The Procfile's processes by name, each line run as ``bin/run`` runs it (``/bin/sh -c 'exec
    <line>'`` in the checkout, see ``project.supervise``); its ``${...}`` come from the
    environment the caller gives them."""
    procfile = parse_procfile((REPO / "Procfile").read_text())
    return {name: ["/bin/sh", "-c", f"exec {line}"] for name, line in procfile}


def _bench_commands(
    env: dict[str, str], queues: str, *, beat: bool, access_log: bool, log_dir: Path
) -> tuple[dict[str, list[str]], list[str]]:
    """The bench's own command lines for the platform's processes, by name, and the Celery
    node names it gives its workers (see ``platform``)."""
    python = [sys.executable, "-m"]
    logged = ["--access-logfile", "-"] if access_log else []
    uvicorn = ["--worker-class", "uvicorn_worker.UvicornWorker", "--log-level", "warning"]
    commands = {
        "registry": [
            *(*python, "gunicorn", "project.registry_asgi:application", *uvicorn),
            *("--bind", env["REGISTRY_BIND"], "--workers", "1", *logged),
        ],
        "gunicorn": [
            *(*python, "gunicorn", "project.asgi:application", *uvicorn),
            *("--bind", env["BIND"], "--workers", str(WEB_WORKERS), *logged),
        ],
    }
    if beat:
        schedule = str(log_dir / "celerybeat-schedule")
        commands["beat"] = [*python, "celery", "-A", "project", "beat", "-l", "WARNING"]
        commands["beat"] += ["--schedule", schedule]
    names = []
    for index in range(WORKER_PROCESSES):
        node = f"bench{index}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        names.append(node)
        commands[f"worker{index}"] = [
            *(*python, "celery", "-A", "project", "worker", "-l", "WARNING", "-P", "prefork"),
            *("-c", str(WORKER_CONCURRENCY), "-n", node, "-Q", queues),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ]
    return commands, names


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
    procfile: bool = False,
) -> Iterator[Platform]:
    """gunicorn (API and registry listener) + Celery worker(s) on ``backend`` (the one new
    workspaces are recorded on), with this process's database and Redis, and Debian's Caddy as
    the proxy when ``proxy`` (serving the platform's configuration, as ``bin/run`` starts it);
    ``extra_env`` is added to their environment (say, a Celery queue of their own so
    that two platforms can run side by side). With ``beat``, Celery beat runs too and the workers
    also consume the sweep queue, as the Procfile's worker does (the sweeps, liveness among them,
    then run as in production); with ``access_log``, gunicorn logs every request to its log file,
    as the Procfile's web and registry lines do. Django must be set up (setup_django); on the
    Docker backend, DOCKER_HOST must point at a running engine.

    With ``procfile``, the processes are the Procfile's own lines instead (``procfile_commands``:
    web, registry, worker, beat and proxy, with their defaults: the settings' log level, access
    logs, the worker's gossip, mingle and heartbeat, ``RUN_DIR`` and ``PROMETHEUS_MULTIPROC_DIR``
    as ``bin/run`` sets them, in ``log_dir``), ``proxy``, ``beat`` and ``access_log`` aside; their
    worker's node name is the Procfile's, so this platform needs a Redis of its own
    (``private_redis``)."""
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
        "BIND": f"127.0.0.1:{port}",
        "REGISTRY_BIND": f"0.0.0.0:{registry_port}",
        # Agents call the registry listener; on a workspace network the host part becomes the
        # network's gateway (the backend rewrites it).
        "PLATFORM_URL": f"http://127.0.0.1:{registry_port}",
        "PLATFORM_PUBLIC_URL": url,
        "PROXY_ADMIN": f"127.0.0.1:{admin_port}",
        "PROXY_BIND": f"127.0.0.1:{proxy_port}",
        "PLATFORM_ID": platform_id,
        "PYTHONUNBUFFERED": "1",
        # The benchmarks measure cycles, not admission: no quota or cap refuses their batches.
        "WORKSPACE_QUOTA_PER_USER": "0",
        "PROVISIONING_CONCURRENCY_LIMIT": "0",
        # The bench pings its own workers below: /readyz answers once the web process reaches
        # PostgreSQL and Redis.
        "READYZ_REQUIRE_WORKERS": "false",
        # The bench's own lines log warnings only; the Procfile's keep the settings' level.
        **({} if procfile else {"LOG_LEVEL": "WARNING"}),
        **(extra_env or {}),
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    queues = env.get("CELERY_LIFECYCLE_QUEUE") or str(settings.CELERY_TASK_DEFAULT_QUEUE)
    if beat:
        queues += f",{settings.CELERY_SWEEP_QUEUE}"
    nodes: list[str] = []
    if procfile:
        # As bin/run sets them, in the run's own folder.
        env["RUN_DIR"] = str(log_dir)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(log_dir / "metrics")
        (log_dir / "metrics").mkdir(exist_ok=True)
        commands = procfile_commands()
        web_name, proxy_name = "web", "proxy" if "proxy" in commands else ""
    else:
        commands, nodes = _bench_commands(
            env, queues, beat=beat, access_log=access_log, log_dir=log_dir
        )
        if proxy:
            caddy = ["caddy", "run", "--config", str(log_dir / "caddy.json")]
            commands = {"caddy": caddy, **commands}
        web_name, proxy_name = "gunicorn", "caddy" if proxy else ""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if proxy_name:
            write_proxy_config(env, log_dir / "caddy.json")
        for part, command in commands.items():
            log = open(log_dir / f"{part}.log", "ab")  # noqa: SIM115 - lives as long as the process
            procs[part] = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_ready(procs[web_name], port, "/readyz", 200, log_dir / f"{web_name}.log")
        # The registry answers only /api/registry/: a 404 elsewhere says it is up.
        _wait_ready(procs["registry"], registry_port, "/healthz", 404, log_dir / "registry.log")
        from project.celery import app

        def answers(node: str | None) -> bool:
            destination = [node] if node else None
            return bool(app.control.ping(destination=destination, timeout=0.5))

        # The Procfile's worker is the only one on the platform's own Redis: any answer is its.
        waited: list[str | None] = [*nodes] or [None]
        for node in waited:
            wait_until(functools.partial(answers, node), 60, f"worker {node or ''}", interval=0.2)
        pids = [proc.pid for proc in procs.values()]
        parts = {part: proc.pid for part, proc in procs.items()}
        yield Platform(user.username, url, port, token, platform_id, env, log_dir, pids, parts)
    finally:
        for proc in reversed(procs.values()):
            stop(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, path: str, status: int, log: Path
) -> None:
    """Until the server on ``port`` answers ``path`` with ``status``; fails when it exits."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited; see {log}")
        try:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            probe.request("GET", path)
            return probe.getresponse().status == status
        except OSError:
            return False

    wait_until(ready, 60, f"the server on port {port}", interval=0.2)


def ready_pool_members(template: str, backend: str) -> int:
    """How many members of ``template``'s warm pool a create could claim now on ``backend``."""
    from workspaces.manifests import invalidate_templates, templates
    from workspaces.models import Workspace
    from workspaces.services.claims import ready_members

    invalidate_templates()
    manifest = templates().get(template)
    assert manifest is not None, template
    return Workspace.objects.filter(ready_members(manifest, backend)).count()


def label_key(name: str) -> str:
    """A label's key as the Docker and Swarm backends write it (``provisioning.backends.engine``),
    for benches that make instances themselves. Django is set up by then."""
    from provisioning.backends.engine import label

    return label(name)


def workspace_labels(
    workspace_id: uuid.UUID | str, generation: int | None = None
) -> dict[str, str]:
    """The labels the backends put on a workspace's volume, and with ``generation`` on its
    container or service."""
    from provisioning.backends.engine import labels

    return labels(workspace_id, generation)


def remove_labelled(label: str) -> None:
    """Force-remove every container, volume and network carrying ``label`` (key=value), in
    parallel."""
    from provisioning.backends.engine import make_client

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

    def __init__(self, host: str = "127.0.0.1") -> None:
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

        # On every address (host="0.0.0.0"), the gateway of a workspace's link reaches it.
        self.server = ThreadingHTTPServer((host, 0), Handler)
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
