"""Helpers for tests that run real processes: Celery workers, agents."""

from __future__ import annotations

import contextlib
import os
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
        PYTHONUNBUFFERED="1",
    )
    if settings.DOCKER_HOST:
        env["DOCKER_HOST"] = settings.DOCKER_HOST
    env.update(extra)
    return env


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
    ) -> None:
        self.name = f"{name or 'w' + uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.env = env
        self.concurrency = concurrency
        self.log_path = (log_dir or Path(settings.WORKSPACE_DATA_DIR)) / f"{self.name}.log"
        self.queues = (
            queues or f"{settings.CELERY_TASK_DEFAULT_QUEUE},{settings.CELERY_SWEEP_QUEUE}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Worker:
        from project.celery import app

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "project",
                "worker",
                "-l",
                "INFO",
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
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

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


@contextlib.contextmanager
def lifecycle_queue(name: str) -> Iterator[None]:
    """Publish this process's lifecycle tasks to queue ``name`` for the block, so only the worker
    consuming it (say, one whose DOCKER_HOST points at a dead engine) runs them."""
    from project.celery import app

    previous = app.conf.task_default_queue
    app.conf.task_default_queue = name
    try:
        yield
    finally:
        app.conf.task_default_queue = previous


def api_events(api: Any, workspace_id: str) -> list[dict]:
    response = api.get(f"/api/workspaces/{workspace_id}/events/?page_size=500")
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


def docker_containers(engine: Any, workspace_id: str) -> list[Any]:
    """Every container on the engine labelled with the workspace's id, running or not."""
    from provisioning.backends.docker import platform_filter, workspace_filter

    labels = [platform_filter(), workspace_filter(workspace_id)]
    return list(engine.containers.list(all=True, filters={"label": labels}))
