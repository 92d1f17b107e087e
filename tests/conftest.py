from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import F
from django.utils import timezone
from pytest_django import live_server_helper
from rest_framework.test import APIClient

from project.env import env_bool
from tests.stack import Stack
from tests.support import (
    Caddy,
    RegistryListener,
    Worker,
    kill_all_instances,
    lifecycle_queue,
    service_env,
    write_templates,
)
from workspaces.manifests import invalidate_templates, templates
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.status import DesiredState, WorkspaceStatus

# Tests that need any of these are slow by nature: real workers, a real engine, a live server.
SLOW_FIXTURES = {
    "stack",
    "on_stack",
    "celery_worker",
    "module_worker",
    "docker_engine",
    "docker_worker",
    "live_server",
    "platform_url",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow what starts processes or an engine, so ``bin/test -m 'not slow'`` is the quick
    loop; heavy tests that need none of these carry ``@pytest.mark.slow`` themselves."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        marked = item.get_closest_marker("e2e") or item.get_closest_marker("docker")
        if marked or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


class _LiveServer(live_server_helper.LiveServer):
    """Bound to every address of the host, so isolated process workspaces reach it at their
    link's gateway as the registry (as bin/run's registry listener binds 0.0.0.0); named by
    loopback, as pytest-django's would be."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.thread.port}"


@pytest.fixture(scope="session")
def live_server(request: pytest.FixtureRequest) -> Iterator[_LiveServer]:
    port = os.environ["DJANGO_LIVE_TEST_SERVER_ADDRESS"].rsplit(":", 1)[1]
    server = _LiveServer(f"0.0.0.0:{port}")
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _clean_services() -> Iterator[None]:
    """A fresh test Redis database and data folder per session; leave no process behind."""
    get_redis().flushdb()
    data = Path(settings.WORKSPACE_DATA_DIR)
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    yield
    kill_all_instances()
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR", data), ignore_errors=True)


@pytest.fixture
def make_user(db: Any) -> Any:
    def make(username: str, *, staff: bool = False) -> Any:
        return get_user_model().objects.create_user(
            username=username, password="x-password-123", is_staff=staff
        )

    return make


@pytest.fixture
def user(make_user: Any) -> Any:
    return make_user("alice")


@pytest.fixture
def other_user(make_user: Any) -> Any:
    return make_user("mallory")


def api_key_for(user: Any) -> str:
    """A new API token for ``user`` (stored hashed): the raw key, as a client holds it."""
    from workspaces import services

    return services.issue_api_token(user)


def client_for(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key_for(user)}")
    return client


@pytest.fixture
def api(user: Any) -> APIClient:
    return client_for(user)


@pytest.fixture
def platform_url(live_server: Any, settings: Any) -> str:
    """Agents started by this process call the live test server."""
    settings.PLATFORM_URL = live_server.url
    return str(live_server.url)


@pytest.fixture
def instances() -> Iterator[None]:
    """Stop every process-backend instance a test started."""
    yield
    kill_all_instances()


@pytest.fixture(scope="session")
def session_templates(tmp_path_factory: Any) -> Path:
    """The shipped templates plus the tests' own (agent settings such as fast heartbeats come
    from a manifest: users cannot set AGENT_* env). The session's workers load this folder."""
    return write_templates(tmp_path_factory.mktemp("session") / "templates")


@pytest.fixture
def use_session_templates(session_templates: Path, settings: Any) -> Iterator[Path]:
    """This test reads the templates the session's workers load (``session_templates``)."""
    settings.WORKSPACE_TEMPLATES_DIR = session_templates
    invalidate_templates()
    yield session_templates
    invalidate_templates()


@pytest.fixture(scope="session")
def worker_env(
    django_db_setup: Any, django_db_blocker: Any, live_server: Any, session_templates: Path
) -> dict[str, str]:
    with django_db_blocker.unblock():
        return service_env(live_server.url, WORKSPACE_TEMPLATES_DIR=str(session_templates))


@pytest.fixture(scope="module")
def stack(django_db_setup: Any, django_db_blocker: Any, session_templates: Path) -> Iterator[Stack]:
    """The platform as ``bin/run`` starts it (tests/stack.py), once per test module that uses
    it: the tests of record for the pages, the API over HTTP, the streams and the browser. It
    shares the test database, so it runs only while its module's tests do: its beat's sweeps
    and reconciler would otherwise act on the rows of every other test (a second platform on
    one database), and nothing of it is left to meet the next module."""
    with django_db_blocker.unblock():
        built = Stack(
            session_templates,
            # Streams end soon, so each test's pages reconnect within its time; few log stream
            # places, so a test can take them all.
            env={
                "EVENTS_STREAM_MAX_SECONDS": "20",
                "LOGS_STREAM_MAX_SECONDS": "20",
                "LOGS_STREAMS_PER_USER": "3",
            },
        )
    try:
        built.start()
        yield built
    finally:
        built.stop_workspaces()
        built.stop()
        built.cleanup()


def _let_requested_cycles_end(django_db_blocker: Any) -> None:
    """Wait (bounded) until every cycle a test's requests asked for has ended. A cycle still
    writing while the test's tables are emptied deadlocks with the TRUNCATE (it holds a row, the
    TRUNCATE the next table), and the next test then meets the last one's rows."""
    with django_db_blocker.unblock():
        deadline = time.monotonic() + 30
        pending = Workspace.objects.filter(requested_seq__gt=F("handled_seq"))
        while pending.exclude(status=WorkspaceStatus.REMOVED).exists():
            if time.monotonic() > deadline:
                break  # a cycle that never ends is the test's to report, not the teardown's
            time.sleep(0.1)


@pytest.fixture
def on_stack(stack: Stack, django_db_blocker: Any) -> Iterator[Stack]:
    """The module's stack for one test; the workspaces it started are stopped after it, once
    the cycles its requests asked for have ended."""
    yield stack
    _let_requested_cycles_end(django_db_blocker)
    stack.stop_workspaces()


@pytest.fixture(scope="module")
def module_worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    """One real Celery worker process (prefork, 2 children) per test module that asks for one.
    Like the stack, it lives only while its module's tests do: a worker left running would take
    the tasks that other modules' tests enqueue (they expect none to run) and run their cycles
    while those tests' tables are emptied."""
    worker = Worker(worker_env, concurrency=2, name="e2e").start()
    yield worker
    worker.stop()
    # Keep the log where a person can read it after the data folder is cleaned up.
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-worker.log")


@pytest.fixture
def celery_worker(module_worker: Worker, django_db_blocker: Any) -> Iterator[Worker]:
    """The module's worker for one test; the cycles the test asked for end before its tables
    are emptied."""
    yield module_worker
    _let_requested_cycles_end(django_db_blocker)


@pytest.fixture(scope="session", autouse=True)
def caddy() -> Iterator[Caddy]:
    """The session's real proxy, on its own admin and listen ports (tests/settings.py), serving
    the platform's configuration (one route for every workspace host)."""
    proxy = Caddy(Path(tempfile.gettempdir()) / f"ws-test-caddy-{os.getpid()}").start()
    yield proxy
    proxy.stop()
    shutil.rmtree(proxy.directory, ignore_errors=True)


# --- Docker ------------------------------------------------------------------------------------
DOCKER_QUEUE = "lifecycle-docker"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """A client for the real engine at DOCKER_HOST, with the agent image built on it.

    Skips only when no DOCKER_HOST is configured and REQUIRE_DOCKER is false or unset (a bare
    ``pytest`` run, or ``bin/test --no-docker``, which says so loudly). ``bin/test`` otherwise
    sets REQUIRE_DOCKER=1, so a missing or unreachable engine fails instead of skipping.
    At the end, removes every container and volume labelled with this session's PLATFORM_ID.
    """
    if not settings.DOCKER_HOST:
        if env_bool("REQUIRE_DOCKER", False):
            pytest.fail("REQUIRE_DOCKER is set but DOCKER_HOST is not: start dockerd, export it")
        pytest.skip("no Docker engine configured (set DOCKER_HOST, or run bin/test)")
    from provisioning.backends.agent_image import build_agent_image
    from provisioning.backends.engine import make_client, platform_filter

    client = make_client()
    client.ping()  # an unreachable configured engine is an error, never a skip
    build_agent_image()
    yield client
    labelled: dict[str, Any] = {"label": platform_filter()}
    for container in client.containers.list(all=True, filters=labelled, sparse=True):
        container.remove(force=True)
    for volume in client.volumes.list(filters=labelled):
        volume.remove(force=True)
    for network in client.networks.list(filters=labelled):
        network.remove()
    client.close()


def require_gvisor(engine: Any) -> None:
    """Fail (REQUIRE_GVISOR=1, as .ci/run sets it) or skip unless the engine has gVisor's runtime
    registered under DOCKER_GVISOR_RUNTIME."""
    runtimes = engine.info().get("Runtimes") or {}
    if settings.DOCKER_GVISOR_RUNTIME in runtimes:
        return
    missing = (
        f"the engine at {settings.DOCKER_HOST} has no runtime {settings.DOCKER_GVISOR_RUNTIME!r} "
        f"(it has {', '.join(sorted(runtimes))}): register runsc in its daemon.json "
        "as bin/test does"
    )
    if env_bool("REQUIRE_GVISOR", False):
        pytest.fail(f"REQUIRE_GVISOR is set but {missing}")
    pytest.skip(missing)


@pytest.fixture
def gvisor_engine(docker_engine: Any) -> Any:
    """The engine, which must have gVisor's runtime (``require_gvisor``). Function-scoped: a
    parametrized fixture may ask for it without being the first to build a session fixture."""
    require_gvisor(docker_engine)
    return docker_engine


@pytest.fixture(scope="session")
def registry_listener(worker_env: dict[str, str]) -> Iterator[RegistryListener]:
    """The registry listener as a real process, where Docker workspaces reach it (their
    network's gateway): what agents on the Docker backend call."""
    # Only Docker workspaces call it, so what registration enqueues (the route write) goes to
    # the queue the Docker worker consumes.
    listener = RegistryListener({**worker_env, "CELERY_LIFECYCLE_QUEUE": DOCKER_QUEUE}).start()
    yield listener
    listener.stop()


def _docker_worker(
    worker_env: dict[str, str],
    registry_listener: RegistryListener,
    queue: str,
    name: str,
    concurrency: int,
    **extra: str,
) -> Iterator[Worker]:
    """A real Celery worker on the Docker backend, alone on its lifecycle queue; its agents call
    the registry listener (PLATFORM_URL's host becomes each workspace's gateway)."""
    env = {
        **worker_env,
        "WORKSPACE_BACKEND": "docker",
        "CELERY_LIFECYCLE_QUEUE": queue,
        "PLATFORM_URL": registry_listener.url,
        **extra,
    }
    worker = Worker(env, concurrency=concurrency, name=name, queues=queue).start()
    yield worker
    worker.stop()
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / f"e2e-{name}-worker.log")


@pytest.fixture(scope="session")
def docker_worker(
    docker_engine: Any, worker_env: dict[str, str], registry_listener: RegistryListener
) -> Iterator[Worker]:
    """The Docker backend's worker, in the default DOCKER_NETWORK_MODE (veth)."""
    yield from _docker_worker(worker_env, registry_listener, DOCKER_QUEUE, "docker", 3)


@pytest.fixture
def on_docker(docker_worker: Worker, settings: Any, django_db_blocker: Any) -> Iterator[Worker]:
    """New workspaces are recorded on the docker backend and their tasks go to docker_worker."""
    settings.WORKSPACE_BACKEND = "docker"
    with lifecycle_queue(DOCKER_QUEUE):
        yield docker_worker
    _let_requested_cycles_end(django_db_blocker)


DOCKER_NETWORKS_QUEUE = "lifecycle-docker-networks"


@pytest.fixture(scope="session")
def docker_networks_worker(
    docker_engine: Any, worker_env: dict[str, str], registry_listener: RegistryListener
) -> Iterator[Worker]:
    """A Docker backend worker with DOCKER_NETWORK_MODE=workspace (one internal network per
    workspace, made through the engine), on a queue of its own."""
    yield from _docker_worker(
        worker_env,
        registry_listener,
        DOCKER_NETWORKS_QUEUE,
        "docker-networks",
        2,
        DOCKER_NETWORK_MODE="workspace",
    )


@pytest.fixture
def on_docker_networks(
    docker_networks_worker: Worker, settings: Any, django_db_blocker: Any
) -> Iterator[Worker]:
    """As on_docker, with the worker whose workspaces sit on Docker networks."""
    settings.WORKSPACE_BACKEND = "docker"
    settings.DOCKER_NETWORK_MODE = "workspace"
    with lifecycle_queue(DOCKER_NETWORKS_QUEUE):
        yield docker_networks_worker
    _let_requested_cycles_end(django_db_blocker)


@pytest.fixture
def templates_dir(tmp_path: Path, settings: Any) -> Iterator[Path]:
    """The shipped templates plus EXTRA_MANIFESTS, in a folder this test may edit."""
    directory = write_templates(tmp_path / "templates")
    settings.WORKSPACE_TEMPLATES_DIR = directory
    settings.PROVISION_TIMEOUT_SECONDS = None
    invalidate_templates()
    yield directory
    invalidate_templates()


MakeRow = Callable[..., Workspace]


@pytest.fixture
def make_row(user: Any) -> MakeRow:
    """A workspace row in ``provisioning`` whose cycle began ``age`` ago (the test sets the
    deadline in the database; nothing sleeps)."""
    counter = iter(range(1, 1_000_000))

    def make(
        template: str = "shell-default",
        *,
        age: timedelta,
        now: datetime | None = None,
        runtime: str | None = None,
        name: str | None = None,
        backend: str = "process",
        generation: int = 1,
        pending: bool = False,
        env: dict[str, str] | None = None,
        **fields: Any,
    ) -> Workspace:
        manifest = templates().get(template)
        return Workspace.objects.create(
            owner=user,
            name=name or f"ws-{next(counter)}",
            template=template,
            runtime=runtime or (manifest.runtime if manifest else "shell"),
            backend=backend,
            status=WorkspaceStatus.PROVISIONING,
            desired_state=DesiredState.RUNNING,
            generation=generation,
            # A finished cycle waiting for its agent has handled the request; `pending` models a
            # cycle that never finished (a killed worker) or a request queued behind it.
            requested_seq=1,
            handled_seq=0 if pending else 1,
            provisioning_started_at=(now or timezone.now()) - age,
            env=env or {},
            **fields,
        )

    return make
