"""The fault suite: Redis, PostgreSQL, workers, the engine and workspaces fail under a request
storm, and the system heals itself (invariant 13).

Everything is real: a Redis server of the suite's own (it is SIGKILLed and restarted), Celery
worker processes and Celery beat, the live API over HTTP, agents that register and heartbeat, the
process backend (and a real Docker engine for the engine restart). Each test ends by waiting for
convergence within a bound and then asserts:

* every workspace whose last accepted request says "run" is ``online`` with exactly one instance
  (counted in /proc by its ``WORKSPACE_ID``; for Docker, running containers by label);
* nothing is stuck (no pending intent, no ``provisioning``/``stopping``/``removing`` row);
* no workspace that was stopped or removed has an instance;
* no response was a 5xx other than 503 (which carries Retry-After), and no 503 answered a
  request that had committed (a create's retry never finds the workspace already made);
* no intent was lost: each workspace ends as its last accepted request asked.

Measured figures from these runs are in docs/faults.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings

from project.celery import app as celery_app
from tests.support import (
    Beat,
    Worker,
    kill_all_instances,
    service_env,
    set_celery_conf,
    wait_for,
)
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import DesiredState, EventSource, WorkspaceStatus

S = WorkspaceStatus
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Bounds: how long the system may take to converge after the last fault.
CONVERGE_SECONDS = 150
STORM_SIZE = 12

# The worker and beat run the sweeps often and restart quickly, so convergence fits in CI.
FAST_HEALING = {
    "REDRIVE_INTERVAL_SECONDS": "3",
    "RECONCILE_INTERVAL_SECONDS": "3",
    "LIVENESS_SWEEP_INTERVAL_SECONDS": "3",
    "SWEEP_PROVISIONING_INTERVAL_SECONDS": "5",
    "RESTART_BACKOFF_BASE_SECONDS": "1",
    "RESTART_BACKOFF_MAX_SECONDS": "4",
    "GATE_LEASE_SECONDS": "6",
    "GATE_BUSY_RETRY_SECONDS": "1",
    "CYCLE_TIME_LIMIT_SECONDS": "40",
    "SWEEP_TIME_LIMIT_SECONDS": "20",
    "CELERY_VISIBILITY_TIMEOUT_SECONDS": "60",
    "DATABASE_CONN_MAX_AGE": "0",
    # An agent that ignores SIGTERM keeps a stop cycle busy this long (the late-ack test).
    "STOP_GRACE_SECONDS": "8",
}


# --- the suite's own Redis server -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of this suite's own, without persistence: a restart comes back empty."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=20, message=f"redis-server on {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Stack:
    redis: RedisServer
    env: dict[str, str]
    directory: Path
    workers: list[Worker] = field(default_factory=list)
    beat: Beat | None = None

    def start_worker(self, name: str) -> Worker:
        worker = Worker(self.env, concurrency=2, name=name, log_dir=self.directory).start(
            timeout=90
        )
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.beat is not None:
            self.beat.stop()


def _use_broker(url: str) -> None:
    """Point this process's Celery app (the live API publishes with it) at ``url``."""
    from project.celery import app

    celery_app: Any = app
    set_celery_conf("broker_url", url)
    # What Celery does after a fork: the next publish opens a pool on the new broker. The old
    # pool is dropped, not closed: closing it breaks producers that later tests take from it.
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@pytest.fixture
def stack(live_server: Any, tmp_path: Path, session_templates: Path) -> Iterator[Stack]:
    from project.celery import app
    from workspaces.manifests import invalidate_templates

    directory = Path(tempfile.mkdtemp(prefix="faults-"))
    redis = RedisServer(_free_port(), directory).start()
    previous_broker = app.conf.broker_url
    with override_settings(
        REDIS_URL=redis.url,
        CELERY_BROKER_URL=redis.url,
        PLATFORM_URL=live_server.url,
        RETRY_AFTER_SECONDS=1,
        # The shipped templates plus the tests' own (agent settings come from manifests).
        WORKSPACE_TEMPLATES_DIR=session_templates,
    ):
        invalidate_templates()
        _use_broker(redis.url)
        env = service_env(
            live_server.url,
            REDIS_URL=redis.url,
            WORKSPACE_TEMPLATES_DIR=str(session_templates),
            **FAST_HEALING,
        )
        built = Stack(redis, env, directory)
        try:
            built.start_worker("faults-a")
            built.beat = Beat(env, directory).start()
            yield built
        finally:
            built.stop()
            kill_all_instances()
            redis.kill()
            _use_broker(previous_broker)
            for log in directory.glob("*.log"):
                shutil.copy(log, Path(tempfile.gettempdir()) / f"faults-{log.name}")
            shutil.rmtree(directory, ignore_errors=True)


# --- the storm's client ---------------------------------------------------------------------------
class Client:
    """An API client over HTTP that retries a 503 after its Retry-After (capped), as a client
    should, and records every status it was answered."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.statuses: Counter[int] = Counter()
        self.bad: list[str] = []
        self.lock = threading.Lock()

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        statuses, data = self.answers(method, path, body)
        return statuses[-1], data

    def answers(self, method: str, path: str, body: dict | None = None) -> tuple[list[int], Any]:
        """Every status the request was answered, the retries' too, and the last body."""
        statuses: list[int] = []
        for _ in range(60):
            request = urllib.request.Request(
                self.base + path,
                data=json.dumps(body).encode() if body is not None else None,
                method=method,
                headers={
                    "Authorization": f"Token {self.token}",
                    "Content-Type": "application/json",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, raw, retry_after = response.status, response.read(), None
            except urllib.error.HTTPError as exc:
                status, raw = exc.code, exc.read()
                retry_after = exc.headers.get("Retry-After")
            statuses.append(status)
            with self.lock:
                self.statuses[status] += 1
                if status >= 500 and status != 503:
                    self.bad.append(f"{method} {path} -> {status}: {raw[:300]!r}")
                if status == 503 and retry_after is None:
                    self.bad.append(f"{method} {path} -> 503 without Retry-After")
            if status != 503:
                return statuses, json.loads(raw) if raw else None
            time.sleep(min(float(retry_after or 1), 1.0))
        raise AssertionError(f"{method} {path}: still 503 after 60 tries")


@dataclass
class Intent:
    name: str
    desired: DesiredState = DesiredState.RUNNING
    workspace_id: str = ""


def _client(user: Any, live_server: Any) -> Client:
    from workspaces import services

    return Client(live_server.url, services.issue_api_token(user))


def _create(client: Client, intent: Intent) -> None:
    body = {"name": intent.name, "template": "shell-default"}
    statuses, data = client.answers("POST", "/api/workspaces/", body)
    # A 503 is for a request that committed nothing: the client's retry then creates the
    # workspace (201). A retry told "already have a workspace" means the 503 answered a create
    # that had committed: a committed intent answered 5xx, which invariant 13 rules out.
    committed_then_503 = (
        503 in statuses and statuses[-1] == 400 and "already have a workspace" in json.dumps(data)
    )
    assert not committed_then_503, (
        f"create {intent.name}: committed, yet answered 503 (answers {statuses}, last {data})"
    )
    assert statuses[-1] == 201, (intent.name, statuses, data)
    intent.workspace_id = data["id"]


def _act(client: Client, intent: Intent, action: str) -> None:
    assert intent.workspace_id
    if action == "delete":
        status, data = client.call("DELETE", f"/api/workspaces/{intent.workspace_id}/")
    else:
        status, data = client.call("POST", f"/api/workspaces/{intent.workspace_id}/{action}/")
    assert status in (202, 409), (action, status, data)
    if status == 202:
        intent.desired = {
            "stop": DesiredState.STOPPED,
            "delete": DesiredState.REMOVED,
        }.get(action, DesiredState.RUNNING)


SCRIPTS = (["restart"], ["stop", "start"], ["delete"], ["restart", "restart"], ["stop"])


def storm(client: Client, prefix: str, size: int = STORM_SIZE) -> list[Intent]:
    """Create ``size`` workspaces, then restart, stop/start, delete and stop them, in parallel."""
    intents = [Intent(f"{prefix}-{index}") for index in range(size)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda intent: _create(client, intent), intents))
    return intents


def storm_actions(client: Client, intents: list[Intent]) -> None:
    def run(pair: tuple[int, Intent]) -> None:
        index, intent = pair
        for action in SCRIPTS[index % len(SCRIPTS)]:
            _act(client, intent, action)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run, enumerate(intents)))


# --- convergence ----------------------------------------------------------------------------------
def _process_instances() -> Counter[str]:
    """Live processes per WORKSPACE_ID in their environment (zombies and monitors excluded)."""
    found: Counter[str] = Counter()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"WORKSPACE_ID="):
                found[item.split(b"=", 1)[1].decode()] += 1
    return found


def _problems(
    intents: list[Intent], instances: Callable[[], Counter[str]] = _process_instances
) -> list[str]:
    counts = instances()
    problems: list[str] = []
    for intent in intents:
        assert intent.workspace_id
        row = Workspace.objects.get(id=intent.workspace_id)
        running = counts.get(intent.workspace_id, 0)
        where = f"{intent.name} ({row.status}, wants {intent.desired}, {running} instances)"
        if row.requested_seq != row.handled_seq:
            problems.append(f"{where}: pending intent")
        if row.desired_state != intent.desired:
            problems.append(f"{where}: intent lost (row wants {row.desired_state})")
        expected = {
            DesiredState.RUNNING: (S.ONLINE, 1),
            DesiredState.STOPPED: (S.STOPPED, 0),
            DesiredState.REMOVED: (S.REMOVED, 0),
        }[intent.desired]
        if (row.status, running) != expected:
            problems.append(
                f"{where}: expected {expected[0]} with {expected[1]} instances;"
                f" last events: {_last_events(row)}"
            )
    return problems


def _last_events(row: Workspace, count: int = 6) -> list[str]:
    """The workspace's last events, oldest first: why it is where it is."""
    events = list(WorkspaceEvent.objects.filter(workspace=row).order_by("-id")[:count])
    return [
        f"{event.type}/{event.source} g{event.generation} {json.dumps(event.payload)[:300]}"
        for event in reversed(events)
    ]


def converge(intents: list[Intent], stack: Stack, started: float, **kwargs: Any) -> float:
    """Wait until every workspace is where its last accepted request asked; seconds it took."""
    last: list[str] = []

    def done() -> bool:
        nonlocal last
        last = _problems(intents, **kwargs)
        return not last

    try:
        wait_for(done, timeout=CONVERGE_SECONDS, interval=1.0, message="convergence")
    except AssertionError:
        logs = "\n".join(w.log()[-3000:] for w in stack.workers)
        raise AssertionError(f"not converged: {last}\nworker logs:\n{logs}") from None
    return time.monotonic() - started


def assert_healthy(client: Client, stack: Stack) -> None:
    assert not client.bad, client.bad
    for worker in stack.workers[-1:]:
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
    for status in client.statuses:
        assert status < 500 or status == 503, client.statuses


def report(name: str, **figures: Any) -> None:
    """One line per run, for docs/faults.md (pytest -s shows it; the file keeps it)."""
    line = json.dumps({"fault": name, **figures})
    print(f"\nFAULT {line}")
    with open(Path(tempfile.gettempdir()) / "faults-figures.jsonl", "a") as handle:
        handle.write(line + "\n")


# --- the faults -----------------------------------------------------------------------------------
def test_redis_killed_and_restarted_mid_storm(user, live_server, stack) -> None:
    client = _client(user, live_server)
    intents = storm(client, "redis")
    [worker] = stack.workers
    assert worker.proc is not None
    stack.redis.kill()
    killed = time.monotonic()
    # The broker is down: requests still record their intents and answer 202 (the row is the
    # outbox); nothing is answered 500.
    storm_actions(client, intents)
    time.sleep(3)
    stack.redis.start()
    down = time.monotonic() - killed
    seconds = converge(intents, stack, time.monotonic())
    assert_healthy(client, stack)
    # The same worker process survived the broker's restart and serves the restarted broker.
    assert worker.proc.poll() is None, worker.log()[-3000:]
    assert "Unrecoverable error" not in worker.log()
    assert celery_app.control.ping(destination=[worker.name], timeout=5), "silent on the new broker"
    report(
        "redis_sigkill_restart_empty",
        down_seconds=round(down, 1),
        converged_seconds=round(seconds, 1),
        statuses=dict(client.statuses),
        workspaces=len(intents),
    )


def test_a_cycle_running_through_a_redis_restart_does_not_kill_the_worker(
    user, live_server, stack
) -> None:
    """The measured crash: a late-ack task still running when the worker reconnects to a
    restarted Redis, then acking on the channel of the closed connection, killed the worker with
    AttributeError("'NoneType' object has no attribute 'hostname'"). Here a stop cycle waits out
    an agent that ignores SIGTERM while Redis is killed and restarted under it."""
    client = _client(user, live_server)
    status, data = client.call(
        "POST",
        "/api/workspaces/",
        {"name": "stubborn", "template": "shell-stubborn"},
    )
    assert status == 201, data
    intent = Intent("stubborn", workspace_id=data["id"])
    converge([intent], stack, time.monotonic())
    worker = stack.workers[-1]
    assert worker.proc is not None
    pid = worker.proc.pid
    generation = Workspace.objects.get(id=intent.workspace_id).generation
    _act(client, intent, "stop")
    # The stop cycle has begun (a new generation) and now waits out the grace period.
    wait_for(
        lambda: Workspace.objects.get(id=intent.workspace_id).generation > generation,
        timeout=30,
        message="stop cycle begun",
    )
    stack.redis.kill()
    time.sleep(2)
    stack.redis.start()
    seconds = converge([intent], stack, time.monotonic())
    assert worker.proc.poll() is None, worker.log()[-3000:]
    assert worker.proc.pid == pid
    assert "Unrecoverable error" not in worker.log()
    assert_healthy(client, stack)
    report("redis_restart_during_a_cycle", converged_seconds=round(seconds, 1))


def _a_cycle_runs() -> bool:
    from workspaces.redis_client import get_redis

    prefix = f"{settings.GATE_KEY_PREFIX}:".encode()
    # A gate's key is the prefix and a workspace id; the other keys (held, retry, ...) say more.
    return any(
        len(key) == len(prefix) + 36
        for key in get_redis().scan_iter(match=prefix + b"*", count=1000)
    )


def test_worker_killed_mid_storm_several_times(user, live_server, stack) -> None:
    client = _client(user, live_server)
    intents = storm(client, "wkill")
    storm_actions(client, intents)
    kills = 0
    for round_ in range(3):
        # Kill while a cycle runs (a workspace's gate is held), then start a new worker, as the
        # supervisor does. Each round brings work of its own (restarts of the workspaces meant to
        # run): the storm's cycles may all be over by then.
        running = [intent for intent in intents if intent.desired == DesiredState.RUNNING]
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda intent: _act(client, intent, "restart"), running))
        wait_for(_a_cycle_runs, timeout=30, interval=0.05, message="a cycle running")
        stack.workers[-1].kill()
        kills += 1
        stack.start_worker(f"faults-{round_}")
    seconds = converge(intents, stack, time.monotonic())
    assert_healthy(client, stack)
    report(
        "worker_sigkill_x3",
        kills=kills,
        converged_seconds=round(seconds, 1),
        statuses=dict(client.statuses),
        workspaces=len(intents),
    )


def _own_backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _terminate_backends(database: str, own: int) -> int:
    """Terminate every backend of ``database`` except the test thread's own connection (the one
    pytest-django flushes the database with at the end)."""
    db = connection.settings_dict
    admin = psycopg2.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or None,
        dbname="postgres",
    )
    try:
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> %s AND pid <> pg_backend_pid()",
                [database, own],
            )
            return int(cursor.fetchone()[0])
    finally:
        admin.close()


def test_postgres_backends_terminated_repeatedly(user, live_server, stack) -> None:
    client = _client(user, live_server)
    database = connection.settings_dict["NAME"]
    own = _own_backend_pid()
    terminated = 0
    stop = threading.Event()

    def terminate_loop() -> None:
        nonlocal terminated
        while not stop.is_set():
            terminated += _terminate_backends(database, own)
            stop.wait(0.7)

    killer = threading.Thread(target=terminate_loop, daemon=True)
    killer.start()
    try:
        intents = storm(client, "pgkill")
        storm_actions(client, intents)
        time.sleep(5)  # cycles and sweeps keep losing their connections meanwhile
    finally:
        stop.set()
        killer.join(timeout=10)
    seconds = converge(intents, stack, time.monotonic())
    assert_healthy(client, stack)
    assert terminated > 0
    report(
        "postgres_backends_terminated",
        terminated_backends=terminated,
        converged_seconds=round(seconds, 1),
        statuses=dict(client.statuses),
        workspaces=len(intents),
    )


def _instance_pid(workspace_id: str) -> tuple[int, int | None]:
    state = Workspace.objects.get(id=workspace_id).backend_state
    return int(state["pid"]), state.get("start_time")


def _dead(pid: int, start_time: int | None) -> bool:
    from provisioning.backends.process_launch import alive

    return not alive(pid, start_time)


def test_workspace_killed_behind_the_platforms_back_is_restarted(user, live_server, stack) -> None:
    client = _client(user, live_server)
    intents = storm(client, "wsdie", size=4)
    converge(intents, stack, time.monotonic())
    before = {intent.workspace_id: _instance_pid(intent.workspace_id) for intent in intents}
    killed = time.monotonic()
    for pid, _ in before.values():
        os.killpg(pid, signal.SIGKILL)
    for pid, start_time in before.values():
        wait_for(partial(_dead, pid, start_time), timeout=10, message="instance dead")

    def restarted() -> bool:
        return not _problems(intents) and all(
            _instance_pid(workspace_id) != pid
            for workspace_id, pid in before.items()
            if workspace_id
        )

    wait_for(restarted, timeout=CONVERGE_SECONDS, interval=1.0, message="restarted")
    seconds = time.monotonic() - killed
    for intent in intents:
        deaths = WorkspaceEvent.objects.filter(
            workspace_id=intent.workspace_id,
            source=EventSource.RECONCILER,
            payload__reason="instance_gone",
        )
        (death,) = deaths
        # The monitor saw the instance die of SIGKILL.
        assert death.payload["exit_code"] == -signal.SIGKILL, death.payload
        assert death.payload["restart_attempt"] == 1
        assert "output" in death.payload  # the agent's last log lines
    assert_healthy(client, stack)
    report("workspace_sigkill", workspaces=len(intents), restarted_seconds=round(seconds, 1))


def _restart_engine(host: str) -> float:
    """Restart the Docker engine at ``host`` as its operator would: SIGTERM the daemon named by
    the pid file beside its socket (where CI and the development script keep it), wait for it to
    exit (it stops the containers), start it again with the same command line. Seconds down."""
    assert host.startswith("unix://"), host
    folder = Path(host.removeprefix("unix://")).parent
    pid = int((folder / "dockerd.pid").read_text())
    argv = [
        part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part
    ]
    assert Path(argv[0]).name == "dockerd" and host.removeprefix("unix://") in " ".join(argv)
    began = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=90, message="dockerd stopped")
    log = open(folder / "dockerd.log", "ab")  # noqa: SIM115 - the daemon keeps it
    subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def answers() -> bool:
        import docker

        try:
            client = docker.DockerClient(base_url=host, timeout=5)
            client.ping()
            client.close()
            return True
        except Exception:  # the engine is still starting
            return False

    wait_for(answers, timeout=60, interval=0.2, message="dockerd answering again")
    return time.monotonic() - began


def _running_containers(engine: Any) -> Callable[[], Counter[str]]:
    from provisioning.backends.engine import platform_filter

    def count() -> Counter[str]:
        labelled = {"label": platform_filter(), "status": "running"}
        found: Counter[str] = Counter()
        for container in engine.containers.list(filters=labelled):
            workspace_id = container.labels.get(f"{settings.DOCKER_LABEL_PREFIX}.workspace-id")
            if workspace_id:
                found[workspace_id] += 1
        return found

    return count


@pytest.mark.docker
def test_docker_engine_restarted_with_workspaces_running(
    user, live_server, docker_engine, registry_listener, stack, settings
) -> None:
    settings.WORKSPACE_BACKEND = "docker"  # the API records new workspaces on the engine
    # Docker workspaces sit on internal networks and reach only the registry listener, at their
    # gateway: the stack's worker launches them with its address (the live server listens on
    # loopback, out of their reach).
    for worker in stack.workers:
        worker.stop()
    stack.workers.clear()
    stack.env = {**stack.env, "PLATFORM_URL": registry_listener.url}
    stack.start_worker("faults-docker")
    client = _client(user, live_server)
    intents = storm(client, "engine", size=3)
    instances = _running_containers(docker_engine)
    converge(intents, stack, time.monotonic(), instances=instances)
    before = {
        intent.workspace_id: Workspace.objects.get(id=intent.workspace_id).generation
        for intent in intents
    }
    down = _restart_engine(settings.DOCKER_HOST)
    seconds = converge(intents, stack, time.monotonic(), instances=instances)
    for intent in intents:
        row = Workspace.objects.get(id=intent.workspace_id)
        assert row.generation > before[intent.workspace_id]  # restarted by the policy
        death = WorkspaceEvent.objects.filter(
            workspace_id=intent.workspace_id, payload__reason="instance_gone"
        ).first()
        assert death is not None and "exit_code" in death.payload, intent
    assert_healthy(client, stack)
    report(
        "docker_engine_restart",
        engine_down_seconds=round(down, 1),
        converged_seconds=round(seconds, 1),
        workspaces=len(intents),
    )
