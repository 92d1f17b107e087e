"""Settings come from the environment; a malformed value stops start-up naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from project import env
from tests.support import REPO


def test_typed_readers_parse_good_values() -> None:
    environ = {
        "N": "42",
        "B": "yes",
        "L": "a, b,,c",
        "M": "hermes=1800, claude-code=900",
        "D": "postgres://u:p%40ss@db.example:6543/name?sslmode=require",
        "R": "redis://127.0.0.1:6380/2",
        "U": "http://platform.example:8000/",
    }
    assert env.env_int("N", 1, environ=environ) == 42
    assert env.env_int("MISSING", 7, environ=environ) == 7
    assert env.env_bool("B", False, environ=environ) is True
    assert env.env_list("L", [], environ=environ) == ["a", "b", "c"]
    assert env.env_int_map("M", {}, environ=environ) == {"hermes": 1800, "claude-code": 900}
    db = env.env_database("D", "", environ=environ)
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "u",
        "p@ss",
        "db.example",
        "6543",
        "name",
    )
    assert db["OPTIONS"] == {"sslmode": "require"}
    assert env.env_redis_url("R", "", environ=environ) == "redis://127.0.0.1:6380/2"
    assert env.env_url("U", "", environ=environ) == "http://platform.example:8000"


@pytest.mark.parametrize(
    ("reader", "value"),
    [
        (lambda e: env.env_int("X", 1, environ=e), "ten"),
        (lambda e: env.env_int("X", 1, minimum=3, environ=e), "1"),
        (lambda e: env.env_bool("X", False, environ=e), "maybe"),
        (lambda e: env.env_choice("X", "a", ("a", "b"), environ=e), "c"),
        (lambda e: env.env_int_map("X", {}, environ=e), "hermes:1800"),
        (lambda e: env.env_int_map("X", {}, environ=e), "hermes=-5"),
        (lambda e: env.env_database("X", "", environ=e), "mysql://x/y"),
        (lambda e: env.env_database("X", "", environ=e), "postgres://host:notaport/db"),
        (lambda e: env.env_database("X", "", environ=e), "postgres://host/"),
        (lambda e: env.env_redis_url("X", "", environ=e), "http://redis"),
        (lambda e: env.env_url("X", "", environ=e), "platform:8000"),
        (lambda e: env.env_int_range("X", (1, 2), environ=e), "9-1"),
        (lambda e: env.env_int_range("X", (1, 2), maximum=65535, environ=e), "20000-70000"),
    ],
)
def test_malformed_values_name_the_variable(reader, value) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"\bX\b"):
        reader({"X": value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATE_LEASE_SECONDS", "ten"),
        ("WORKSPACE_BACKEND", "kubernetes"),
        ("DATABASE_URL", "sqlite:///db.sqlite3"),
        ("PLATFORM_URL", "localhost"),
        ("WORKSPACE_APP_PORTS", "20000-70000"),
        ("DOCKER_NETWORK_MODE", "bridge"),
        ("DOCKER_VETH_SUBNET", "10.213.0.0/33"),
        # a /24 holds 128 links, fewer than the default uid range's 1,000 workspaces
        ("DOCKER_VETH_SUBNET", "10.213.0.0/24"),
    ],
)
@pytest.mark.slow
def test_start_up_stops_on_a_malformed_value(variable, value) -> None:
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", variable: value}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert variable in result.stderr
    assert "ImproperlyConfigured" in result.stderr


@pytest.mark.slow
def test_start_up_stops_on_link_names_longer_than_the_kernel_allows() -> None:
    """A process link's host end is the prefix and the uid: 6 + 10 characters exceed 15."""
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "PROCESS_LINK_PREFIX": "wsplnk",
        "DOCKER_BRIDGE_PREFIX": "wsbr",
        "WORKSPACE_UID_RANGE": "1000000000-1000000999",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "PROCESS_LINK_PREFIX" in result.stderr and "15 characters" in result.stderr


def test_celery_settings_that_matter() -> None:
    from django.conf import settings

    from project.celery import app

    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit == settings.CYCLE_TIME_LIMIT_SECONDS
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > settings.SWEEP_TIME_LIMIT_SECONDS
    from provisioning.backends.base import TransientBackendError
    from provisioning.tasks import TRANSIENT_SERVICE_ERRORS, converge_workspace

    assert converge_workspace.max_retries == settings.CONVERGE_MAX_RETRIES == 5
    task: Any = converge_workspace  # the options autoretry reads are not in the type stubs
    assert task.retry_backoff == settings.CONVERGE_RETRY_BACKOFF_SECONDS == 2
    # Transient engine errors and lost database or Redis connections retry; nothing else.
    assert task.autoretry_for == (TransientBackendError, *TRANSIENT_SERVICE_ERRORS)
    assert converge_workspace.soft_time_limit == settings.CYCLE_SOFT_TIME_LIMIT_SECONDS
    # tests/provisioning/test_retries_e2e.py proves in a real worker that these act.
    assert converge_workspace.time_limit == settings.CYCLE_TIME_LIMIT_SECONDS


@pytest.mark.slow
def test_production_settings_do_not_accept_the_test_clients_host() -> None:
    """``testserver`` (Django's test client) is accepted by the test settings only."""
    from django.conf import settings

    assert "testserver" in settings.ALLOWED_HOSTS
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    environment.pop("ALLOWED_HOSTS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); "
            "from django.conf import settings; print(','.join(settings.ALLOWED_HOSTS))",
        ],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "localhost,127.0.0.1,[::1]"
