"""Preflight: a missing ``required_env`` fails the workspace in its first cycle, before any
backend call, naming every missing variable and nothing else; env values never leave the row."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from provisioning import lifecycle, sweeper
from tests.fakes import fake_backend
from workspaces import services
from workspaces.models import AgentToken, Workspace, WorkspaceEvent
from workspaces.status import EventSource, EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db
S = WorkspaceStatus
SECRET_BETA = "beta-secret-value-3c9f1e"
SECRET_EXTRA = "extra-secret-value-8d2a7b"
SECRETS = (SECRET_BETA, SECRET_EXTRA)


@pytest.fixture
def fake(settings: Any, templates_dir: Any) -> Any:
    with fake_backend() as backend:
        settings.WORKSPACE_BACKEND = "fake"
        yield backend


def _create(api: Any, name: str, env: dict[str, str], template: str = "needs-two") -> UUID:
    response = api.post(
        "/api/workspaces/", {"name": name, "template": template, "env": env}, format="json"
    )
    assert response.status_code == 201, response.content
    return UUID(response.json()["id"])


def _failures(workspace_id: UUID) -> list[WorkspaceEvent]:
    return list(
        WorkspaceEvent.objects.filter(workspace_id=workspace_id, type=EventType.PROVISION_FAILED)
    )


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"BETA_KEY": SECRET_BETA, "EXTRA": SECRET_EXTRA}, ["ALPHA_KEY"]),
        ({}, ["ALPHA_KEY", "BETA_KEY"]),
        ({"ALPHA_KEY": "", "BETA_KEY": SECRET_BETA}, ["ALPHA_KEY"]),  # empty is missing
    ],
)
def test_missing_vars_fail_the_first_cycle_naming_each_without_a_backend_call(
    api, fake, env, missing
) -> None:
    workspace_id = _create(api, "pre", env)

    # One cycle decides it: no deadline, no waiting, no retry.
    assert lifecycle.converge(workspace_id) == ["provision"]

    row = Workspace.objects.get(id=workspace_id)
    assert row.status == S.FAILED
    assert not row.is_running and row.backend_state == {}
    assert fake.calls_for(workspace_id) == []  # the backend was never called
    assert not AgentToken.objects.filter(workspace_id=workspace_id).exists()
    [event] = _failures(workspace_id)
    assert event.source == EventSource.PREFLIGHT
    assert event.payload["missing_env"] == missing
    for name in missing:
        assert name in row.last_error
    for given in set(env) - set(missing):
        assert given not in row.last_error  # given variables are not named
        assert given not in json.dumps(event.payload)
    assert lifecycle.converge(workspace_id) == []  # final: nothing retries it

    # The sweep never adds a second failure for it.
    later = timezone.now() + timedelta(days=1)
    assert sweeper.sweep(now=later, use_lock=False).flipped == []
    assert len(_failures(workspace_id)) == 1


def test_all_required_vars_given_reaches_the_backend(api, fake) -> None:
    workspace_id = _create(api, "ok", {"ALPHA_KEY": "a", "BETA_KEY": "b"})
    assert lifecycle.converge(workspace_id) == ["provision"]
    assert "start" in fake.calls_for(workspace_id)
    assert Workspace.objects.get(id=workspace_id).status == S.PROVISIONING
    assert _failures(workspace_id) == []


def test_env_values_never_appear_in_responses_events_admin_or_logs(
    api, fake, make_user, make_row, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[bytes] = []

    def call(method: str, url: str, data: Any = None, **kwargs: Any) -> Any:
        response = getattr(api, method)(url, data, **kwargs)
        bodies.append(response.content)
        return response

    env = {"BETA_KEY": SECRET_BETA, "EXTRA": SECRET_EXTRA}
    created = call(
        "post",
        "/api/workspaces/",
        {"name": "secretive", "template": "needs-two", "env": env},
        format="json",
    )
    workspace_id = UUID(created.json()["id"])
    assert "env" not in created.json()
    lifecycle.converge(workspace_id)  # preflight failure
    # A rejected env: the error names the field, never echoes a value.
    bad = call(
        "post",
        "/api/workspaces/",
        {"name": "bad", "template": "needs-two", "env": {"bad name": SECRET_EXTRA}},
        format="json",
    )
    assert bad.status_code == 400 and "env" in bad.json()["errors"]
    # A swept workspace holding secrets, and the converge that reaps it.
    swept = make_row("shell-default", age=timedelta(minutes=31), backend="fake", env=env)
    sweeper.sweep(use_lock=False)
    lifecycle.converge(swept.id)

    for url in (
        f"/api/workspaces/{workspace_id}/",
        f"/api/workspaces/{swept.id}/",
        "/api/workspaces/",
        "/api/workspaces/?status=failed",
        f"/api/workspaces/{workspace_id}/events/",
        f"/api/workspaces/{swept.id}/events/",
        "/api/templates/",
    ):
        assert call("get", url).status_code == 200
    call("post", f"/api/workspaces/{workspace_id}/restart/")
    call("post", f"/api/workspaces/{workspace_id}/stop/")
    call("delete", f"/api/workspaces/{swept.id}/")

    operator = make_user("operator", staff=True)
    operator.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_workspace", "change_workspace"])
    )
    staff = Client()
    staff.force_login(operator)
    for url in (
        "/admin/workspaces/workspace/",
        f"/admin/workspaces/workspace/{workspace_id}/change/",
        f"/admin/workspaces/workspace/{swept.id}/change/",
    ):
        page = staff.get(url)
        assert page.status_code == 200, url
        bodies.append(page.content)
    assert b"secretive" in bodies[-2]  # the page really rendered the workspace

    events = json.dumps(list(WorkspaceEvent.objects.values("type", "source", "payload")))
    assert "missing_env" in events and "timeout_secs" in events
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "preflight" in logged and "provision_timeout_sweep" in logged
    for secret in SECRETS:
        for body in bodies:
            assert secret.encode() not in body
        assert secret not in events
        assert secret not in logged


@pytest.mark.parametrize("backend", ["process", "swarm"])
def test_a_backend_that_runs_no_container_runtime_refuses_gvisor_at_preflight(
    user, settings, templates_dir, backend
) -> None:
    """The real backends, as the selector constructs them: neither is asked anything (no
    Swarm manager exists here, and none is needed to know the answer)."""
    settings.SWARM_MANAGER_HOST = "unix:///nonexistent/swarm.sock"
    workspace = services.create_workspace(
        owner=user, name="boxed", template="shell-gvisor", backend=backend
    )
    assert workspace.sandbox == "gvisor"

    assert lifecycle.converge(workspace.id) == ["provision"]  # one cycle decides it

    row = Workspace.objects.get(id=workspace.id)
    assert row.status == S.FAILED and not row.is_running and row.backend_state == {}
    [event] = _failures(workspace.id)
    assert event.source == EventSource.PREFLIGHT
    assert event.payload["sandbox"] == "gvisor" and event.payload["backend"] == backend
    assert event.payload["message"] == row.last_error
    assert "gvisor" in row.last_error and backend in row.last_error
    assert lifecycle.converge(workspace.id) == []  # final: nothing retries it
