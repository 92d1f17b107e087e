"""Fixtures for the provisioning tests: a private templates folder and in-flight rows."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from provisioning.manifests import invalidate_templates
from workspaces.models import Workspace
from workspaces.status import DesiredState, WorkspaceStatus

REPO_TEMPLATES = Path(django_settings.BASE_DIR) / "workspace_templates"

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
    # An app listening on $APP_PORT next to the agent (the isolation tests' workspace B).
    "shell-listener": (
        'runtime: shell\ncommand: ["sh", "-c", "{python} -m http.server --bind 127.0.0.1 '
        '$APP_PORT >/dev/null 2>&1 & exec {python} {agent}"]\n'
    ),
    # The same on the Docker backend's busybox image: busybox httpd on 8080, then the agent.
    "docker-listener": (
        'runtime: shell\ncommand: ["/bin/sh", "-c", "httpd -p 8080 -h /tmp && '
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
        from provisioning.manifests import templates

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
