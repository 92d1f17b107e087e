from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from provisioning.redis_client import get_redis
from tests.support import Worker, kill_all_instances, lifecycle_queue, service_env


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


def client_for(user: Any) -> APIClient:
    token, _ = Token.objects.get_or_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
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
def worker_env(django_db_setup: Any, django_db_blocker: Any, live_server: Any) -> dict[str, str]:
    with django_db_blocker.unblock():
        return service_env(live_server.url)


@pytest.fixture(scope="session")
def celery_worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    """One real Celery worker process (prefork, 2 children) for the session's e2e tests."""
    worker = Worker(worker_env, concurrency=2, name="e2e").start()
    yield worker
    worker.stop()
    # Keep the log where a person can read it after the data folder is cleaned up.
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-worker.log")


# --- Docker ------------------------------------------------------------------------------------
DOCKER_QUEUE = "lifecycle-docker"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """A client for the real engine at DOCKER_HOST, with the agent image built on it.

    Skips only when no DOCKER_HOST is configured and REQUIRE_DOCKER is unset; CI sets
    REQUIRE_DOCKER=1, so there a missing or unreachable engine fails instead of skipping.
    At the end, removes every container and volume labelled with this session's PLATFORM_ID.
    """
    if not settings.DOCKER_HOST:
        if os.environ.get("REQUIRE_DOCKER"):
            pytest.fail("REQUIRE_DOCKER is set but DOCKER_HOST is not: start dockerd, export it")
        pytest.skip("no Docker engine configured (set DOCKER_HOST; CI sets REQUIRE_DOCKER=1)")
    from provisioning.backends.docker import build_agent_image, make_client, platform_filter

    client = make_client()
    client.ping()  # an unreachable configured engine is an error, never a skip
    build_agent_image()
    yield client
    labelled: dict[str, Any] = {"label": platform_filter()}
    for container in client.containers.list(all=True, filters=labelled, sparse=True):
        container.remove(force=True)
    for volume in client.volumes.list(filters=labelled):
        volume.remove(force=True)
    client.close()


@pytest.fixture(scope="session")
def docker_worker(docker_engine: Any, worker_env: dict[str, str]) -> Iterator[Worker]:
    """A real Celery worker on the Docker backend, alone on its own lifecycle queue."""
    env = {**worker_env, "WORKSPACE_BACKEND": "docker", "CELERY_LIFECYCLE_QUEUE": DOCKER_QUEUE}
    worker = Worker(env, concurrency=3, name="docker", queues=DOCKER_QUEUE).start()
    yield worker
    worker.stop()
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-docker-worker.log")


@pytest.fixture
def on_docker(docker_worker: Worker, settings: Any) -> Iterator[Worker]:
    """New workspaces are recorded on the docker backend and their tasks go to docker_worker."""
    settings.WORKSPACE_BACKEND = "docker"
    with lifecycle_queue(DOCKER_QUEUE):
        yield docker_worker
