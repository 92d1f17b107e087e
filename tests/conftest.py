from __future__ import annotations

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
from tests.support import Worker, kill_all_instances, service_env


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
