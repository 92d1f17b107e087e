"""Fixtures for the Swarm backend's tests of record: a real swarm of private engines.

``swarm`` is a one-node swarm (a private dockerd, ``swarm init``) made for the session, or the
manager at ``SWARM_MANAGER_HOST`` when that is set. A Celery worker on the Swarm backend consumes
its own queue; its agents run with host networking and call the registry listener on loopback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from project.env import env_bool
from provisioning.backends import reset_backends
from provisioning.backends.agent_image import build_agent_image
from provisioning.backends.engine import make_client, platform_filter
from tests.support import RegistryListener, Worker, lifecycle_queue
from tests.swarm_support import Engine, free_loopback
from workspaces.manifests import invalidate_templates

SWARM_QUEUE = "lifecycle-swarm"


class Swarm:
    def __init__(self, host: str, manager: Engine | None) -> None:
        self.host = host
        self.manager = manager
        self.client = make_client(host)

    def clean(self) -> None:
        """Remove this platform's services, then its secrets and configs."""
        labelled: dict[str, Any] = {"label": platform_filter()}
        for service in self.client.services.list(filters=labelled):
            service.remove()
        for kind in (self.client.secrets, self.client.configs):
            for item in kind.list(filters=labelled):
                for _attempt in range(60):
                    try:
                        item.remove()
                        break
                    except docker.errors.APIError:  # in use until the service is gone
                        time.sleep(0.5)


@pytest.fixture(scope="session")
def swarm() -> Iterator[Swarm]:
    existing = os.environ.get("SWARM_MANAGER_HOST", "")
    manager = None
    if not existing:
        can_start = shutil.which("dockerd") is not None and os.geteuid() == 0
        if not can_start:
            if env_bool("REQUIRE_DOCKER", False):
                pytest.fail("REQUIRE_DOCKER is set but no swarm can be had: set SWARM_MANAGER_HOST")
            pytest.skip("no swarm (set SWARM_MANAGER_HOST, or run as root with dockerd)")
        manager = Engine(free_loopback(set())).start()
        manager.init_swarm()
    result = Swarm(existing or (manager.host if manager else ""), manager)
    try:
        result.client.ping()
        build_agent_image(host=result.host)
        yield result
        result.clean()
    finally:
        result.client.close()
        if manager is not None:
            shutil.copy(
                manager.directory / "dockerd.log", Path(tempfile.gettempdir()) / "swarm-dockerd.log"
            )
            manager.stop()


@pytest.fixture(scope="session")
def swarm_worker(
    swarm: Swarm, worker_env: dict[str, str], registry_listener: RegistryListener
) -> Iterator[Worker]:
    env = {
        **worker_env,
        "WORKSPACE_BACKEND": "swarm",
        "SWARM_MANAGER_HOST": swarm.host,
        "CELERY_LIFECYCLE_QUEUE": SWARM_QUEUE,
        "PLATFORM_URL": registry_listener.url,
    }
    worker = Worker(env, concurrency=2, name="swarm", queues=SWARM_QUEUE).start()
    yield worker
    worker.stop()
    shutil.copy(worker.log_path, Path(tempfile.gettempdir()) / "e2e-swarm-worker.log")


@pytest.fixture
def on_swarm(
    swarm_worker: Worker, swarm: Swarm, settings: Any, session_templates: Path
) -> Iterator[Worker]:
    """New workspaces are recorded on the swarm backend, their tasks go to swarm_worker, and
    this process's own backend calls (the reconciler's pass) go to the same manager. The API
    here knows the workers' templates (the placement ones among them)."""
    settings.WORKSPACE_BACKEND = "swarm"
    settings.SWARM_MANAGER_HOST = swarm.host
    settings.WORKSPACE_TEMPLATES_DIR = session_templates
    invalidate_templates()
    reset_backends()
    with lifecycle_queue(SWARM_QUEUE):
        yield swarm_worker
    reset_backends()
    invalidate_templates()
