"""Helpers for tests that run real processes: Celery workers, agents."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

REPO = Path(__file__).resolve().parent.parent

REPO_TEMPLATES = Path(settings.BASE_DIR) / "workspace_templates"

# Extra manifests the tests need next to the shipped ones.
EXTRA_MANIFESTS = {
    # runtime "shell" has no runtime default in settings, so without the manifest it gets 600 s.
    "slowboot": "runtime: shell\nruntime_config:\n  provision_timeout_seconds: 1200\n",
    "needs-two": "runtime: shell\nruntime_config:\n  required_env: [ALPHA_KEY, BETA_KEY]\n",
    "no-restart": "runtime: shell\nrestart: never\n",
    # A process that runs but never registers: what a stuck boot looks like to the platform.
    # Fast heartbeats: agent settings come from a manifest (users cannot set AGENT_* env).
    "shell-fastbeat": "runtime: shell\nenv:\n  AGENT_HEARTBEAT_SECONDS: '0.3'\n",
    # An agent that ignores SIGTERM: a stop waits out the grace period (test-only behaviour,
    # reachable from a manifest only).
    "shell-stubborn": "runtime: shell\nenv:\n  AGENT_IGNORE_SIGTERM: '1'\n",
    # An app listening on $APP_PORT next to the agent (the isolation tests' workspace B), on
    # every address it has (its namespace's: its loopback and its link).
    "shell-listener": (
        'runtime: shell\ncommand: ["sh", "-c", "{python} -m http.server --bind 0.0.0.0 '
        '$APP_PORT >/dev/null 2>&1 & exec {python} {agent}"]\n'
    ),
    # The same on the Docker backend's busybox image: busybox httpd on 8080, then the agent.
    "docker-listener": (
        'runtime: shell\ncommand: ["/bin/sh", "-c", "httpd -p 8080 -h /tmp && '
        'exec /bin/sh /agent.sh"]\n'
    ),
    # Under the engine's gVisor runtime: the default shell workspace (its app, quick heartbeats),
    # and the isolation tests' B.
    "shell-gvisor": (
        "runtime: shell\nimage: workspace-agent:dev\nsandbox: gvisor\n"
        "env:\n  AGENT_HEARTBEAT_SECONDS: '0.5'\n"
        "app:\n  port: auto\n  health_path: /\n"
    ),
    "docker-listener-gvisor": (
        'runtime: shell\nsandbox: gvisor\ncommand: ["/bin/sh", "-c", "httpd -p 8080 -h /tmp && '
        'exec /bin/sh /agent.sh"]\n'
    ),
    # Swarm placement: each on the node labelled for it (tests/swarm).
    "swarm-zone-a": 'runtime: shell\nplacement:\n  constraints: ["node.labels.ws-zone==a"]\n',
    "swarm-zone-b": 'runtime: shell\nplacement:\n  constraints: ["node.labels.ws-zone==b"]\n',
    "never-registers": (
        'runtime: shell\ncommand: ["{python}", "-c", "import time; time.sleep(600)"]\n'
    ),
}


def write_templates(directory: Path, extra: dict[str, str] | None = None) -> Path:
    shutil.copytree(REPO_TEMPLATES, directory, dirs_exist_ok=True)
    for name, text in {**EXTRA_MANIFESTS, **(extra or {})}.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "config.yaml").write_text(text)
    return directory


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


_backend_uids = itertools.count()


def next_backend_uid() -> int:
    """A uid for a test that drives a backend directly (no row, so no allocation): taken from
    the top of WORKSPACE_UID_RANGE down, never reused in a session, so it never meets a uid the
    database hands out from the bottom."""
    low, high = settings.WORKSPACE_UID_RANGE
    uid = high - next(_backend_uids)
    assert uid >= low, "WORKSPACE_UID_RANGE is too small for the suite"
    return uid


def database_url() -> str:
    db = connection.settings_dict
    auth = db["USER"] or "postgres"
    if db["PASSWORD"]:
        auth += f":{db['PASSWORD']}"
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def service_env(platform_url: str, **extra: str) -> dict[str, str]:
    """The environment a worker (or manage.py) subprocess needs to share the test's services."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url(),
        DATABASE_CONN_MAX_AGE="0",
        REDIS_URL=settings.REDIS_URL,
        GATE_KEY_PREFIX=settings.GATE_KEY_PREFIX,
        WORKSPACE_DATA_DIR=str(settings.WORKSPACE_DATA_DIR),
        WORKSPACE_TEMPLATES_DIR=str(settings.WORKSPACE_TEMPLATES_DIR),
        WORKSPACE_BACKEND=settings.WORKSPACE_BACKEND,
        GATE_LEASE_SECONDS=str(settings.GATE_LEASE_SECONDS),
        STOP_GRACE_SECONDS=str(settings.STOP_GRACE_SECONDS),
        PLATFORM_URL=platform_url,
        PROXY_ADMIN=settings.PROXY_ADMIN,
        PROXY_BIND=settings.PROXY_BIND,
        PYTHONUNBUFFERED="1",
    )
    if settings.DOCKER_HOST:
        env["DOCKER_HOST"] = settings.DOCKER_HOST
    env.update(extra)
    return env


def spawn_logged(
    argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = REPO
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of its own process group, its output appended to
    ``log_path`` (the log stays open as long as the process lives)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it if it outlives ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Beat:
    """A real ``celery beat`` with the project's schedule, its own schedule file in
    ``directory`` and its output in ``directory/beat.log``; ``max_interval`` (seconds) makes it
    look at the schedule that often (sweeps every second in tests)."""

    def __init__(
        self, env: dict[str, str], directory: Path, *, max_interval: float | None = None
    ) -> None:
        self.env = env
        self.directory = directory
        self.log_path = directory / "beat.log"
        self.max_interval = max_interval
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Beat:
        argv = [
            *(sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "INFO"),
            *("--schedule", str(self.directory / f"beat-{uuid.uuid4().hex[:6]}")),
        ]
        if self.max_interval is not None:
            argv += ["--max-interval", str(self.max_interval)]
        self.proc = spawn_logged(argv, self.log_path, self.env)
        return self

    def stop(self) -> None:
        stop_group(self.proc, 20)


class Worker:
    """A real ``celery worker`` process (prefork pool) on the test's broker and database."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        concurrency: int = 2,
        name: str | None = None,
        log_dir: Path | None = None,
        queues: str | None = None,
        loglevel: str = "INFO",
    ) -> None:
        self.name = f"{name or 'w' + uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.loglevel = loglevel
        self.env = env
        self.concurrency = concurrency
        self.log_path = (log_dir or Path(settings.WORKSPACE_DATA_DIR)) / f"{self.name}.log"
        self.queues = (
            queues or f"{settings.CELERY_TASK_DEFAULT_QUEUE},{settings.CELERY_SWEEP_QUEUE}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Worker:
        from project.celery import app

        self.proc = spawn_logged(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "project",
                "worker",
                "-l",
                self.loglevel,
                "-P",
                "prefork",
                "-c",
                str(self.concurrency),
                "-n",
                self.name,
                "-Q",
                self.queues,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            self.log_path,
            self.env,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            return bool(app.control.ping(destination=[self.name], timeout=0.5))

        wait_for(ready, timeout=timeout, interval=0.2, message=f"worker {self.name} ready")
        return self

    def child_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, timeout: float = 20.0) -> None:
        stop_group(self.proc, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def kill_all_instances() -> None:
    """Stop every process-backend instance left under the test data dir."""
    from provisioning.backends.process import ProcessBackend

    backend = ProcessBackend(Path(settings.WORKSPACE_DATA_DIR))
    for info in backend.list_instances():
        backend.stop(uuid.UUID(info.workspace_id), {}, grace_seconds=0.5)


def set_celery_conf(key: str, value: Any) -> Any:
    """Change a Celery setting of this process at run time; returns the previous value. The app
    reads Django's ``CELERY_*`` settings and Celery 5.6 looks the namespaced key up first, so an
    assignment to ``app.conf.<key>`` alone is shadowed: both keys are set."""
    from project.celery import app

    previous = getattr(app.conf, key)
    app.conf[key] = value
    app.conf[f"CELERY_{key.upper()}"] = value
    return previous


@contextlib.contextmanager
def lifecycle_queue(name: str) -> Iterator[None]:
    """Publish this process's lifecycle tasks to queue ``name`` for the block, so only the worker
    consuming it (say, one whose DOCKER_HOST points at a dead engine) runs them."""
    previous = set_celery_conf("task_default_queue", name)
    try:
        yield
    finally:
        set_celery_conf("task_default_queue", previous)


def api_events(api: Any, workspace_id: str) -> list[dict]:
    response = api.get(f"/api/workspaces/{workspace_id}/events/?page_size=500")
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


def api_workspace(api: Any, workspace_id: str) -> dict:
    """``GET /api/workspaces/<id>/`` through the test's API client; anything but 200 fails."""
    response = api.get(f"/api/workspaces/{workspace_id}/")
    assert response.status_code == 200, response.content
    return dict(response.json())


def wait_api_status(
    api: Any,
    workspace_id: str,
    status: str,
    *,
    after_generation: int = 0,
    timeout: float = 60.0,
) -> dict:
    """The workspace as the API shows it once it reaches ``status`` in a cycle past
    ``after_generation``; reaching ``failed`` instead fails at once."""

    def check() -> dict | None:
        body = api_workspace(api, workspace_id)
        assert body["status"] != "failed" or status == "failed", body
        if body["status"] == status and body["generation"] > after_generation:
            return body
        return None

    return dict(wait_for(check, timeout=timeout, message=f"workspace {workspace_id} {status}"))


def docker_containers(engine: Any, workspace_id: str) -> list[Any]:
    """Every container on the engine labelled with the workspace's id, running or not."""
    from provisioning.backends.engine import platform_filter, workspace_filter

    labels = [platform_filter(), workspace_filter(workspace_id)]
    return list(engine.containers.list(all=True, filters={"label": labels}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RegistryListener:
    """The real registry listener (``gunicorn project.registry_asgi``, as the Procfile runs it) on
    the test's database, bound to every host address so workspaces on Docker networks reach it
    at their gateway."""

    def __init__(self, env: dict[str, str], *, bind_host: str = "0.0.0.0") -> None:
        self.port = free_port()
        self.bind = f"{bind_host}:{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_path = Path(settings.WORKSPACE_DATA_DIR) / f"registry-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> RegistryListener:
        import urllib.error
        import urllib.request

        self.proc = spawn_logged(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "project.registry_asgi:application",
                "--worker-class",
                "uvicorn_worker.UvicornWorker",
                "--bind",
                self.bind,
                "--workers",
                "1",
            ],
            self.log_path,
            self.env,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"registry exited: {self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1)
            except urllib.error.HTTPError as exc:
                return exc.code == 404  # answering, and refusing what is not /api/registry/
            except OSError:
                return False
            return False

        wait_for(ready, timeout=timeout, interval=0.2, message="registry listener ready")
        return self

    def stop(self) -> None:
        stop_group(self.proc, 20)


class Caddy:
    """A real Caddy (Debian's package) whose admin API listens on ``PROXY_ADMIN``, started as
    ``bin/run`` starts it: with the platform's whole configuration (``manage.py proxy_config``).
    ``restart(empty=True)`` gives a proxy that forgot it (only its admin listener)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, empty: bool = False) -> Caddy:
        import json

        from provisioning import proxy

        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "caddy.json"
        whole = {"admin": {"listen": settings.PROXY_ADMIN}} if empty else proxy.base_config()
        config.write_text(json.dumps(whole))
        env = {
            **os.environ,
            "HOME": str(self.directory),
            "XDG_CONFIG_HOME": str(self.directory),
            "XDG_DATA_HOME": str(self.directory),
        }
        self.proc = spawn_logged(
            ["caddy", "run", "--config", str(config)], self.directory / "caddy.log", env, None
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"caddy exited: {self.log()[-2000:]}")
            try:
                with socket.create_connection(_host_port(settings.PROXY_ADMIN), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(ready, timeout=20, message="caddy admin API")
        return self

    def stop(self) -> None:
        stop_group(self.proc, 10)

    def restart(self, *, empty: bool = False) -> None:
        self.stop()
        self.start(empty=empty)

    def log(self) -> str:
        path = self.directory / "caddy.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def settled(workspace_id: Any, *statuses: str) -> Any:
    """The workspace row if its cycles are done: status among ``statuses`` (any if none given),
    every request handled (``handled_seq == requested_seq``), its gate free and no busy-gate
    retry scheduled; else None.

    Checking the status alone races with the end of the cycle: a row can read ``online`` while
    the cycle that started it still holds the gate or another request is pending, and then a
    reconciler pass or a new request meets a busy workspace."""
    from provisioning import gate
    from workspaces.models import Workspace

    row = Workspace.objects.filter(id=workspace_id).first()
    if row is None or (statuses and row.status not in statuses):
        return None
    if row.handled_seq != row.requested_seq or gate.is_held(workspace_id):
        return None
    if gate.retry_scheduled(workspace_id):  # a converge that will take the gate is on its way
        return None
    return row


def wait_settled(workspace_id: Any, *statuses: str, timeout: float = 60.0) -> Any:
    """Wait until ``settled(workspace_id, *statuses)``; return the row."""
    return wait_for(
        lambda: settled(workspace_id, *statuses),
        timeout=timeout,
        message=f"workspace {workspace_id} settled in {statuses or 'any status'}",
    )


class WebServer:
    """The web process as ``bin/run`` starts it (gunicorn, uvicorn workers, ``project.asgi``) on
    the test's database and Redis, on a free port. ``env`` adds or overrides settings."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int = 1,
        name: str | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.env = env
        self.workers = workers
        self.name = name or f"web-{uuid.uuid4().hex[:6]}"
        self.log_path = (log_dir or Path(settings.WORKSPACE_DATA_DIR)) / f"{self.name}.log"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WebServer:
        import http.client

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "project.asgi:application",
                "--worker-class",
                "uvicorn_worker.UvicornWorker",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
                "--graceful-timeout",
                "3",
                "--access-logfile",
                "-",
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"web server exited: {self.log()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            except OSError:
                return False

        wait_for(answers, timeout=timeout, interval=0.2, message=f"{self.name} to answer")
        return self

    def kill(self) -> None:
        """SIGKILL the whole server (master and workers): no clean-up code runs."""
        if self.proc is not None and self.proc.poll() is None:
            for child in _children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found
