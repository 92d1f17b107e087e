"""Team expansion: POST /api/teams/ creates a parent and one workspace per member template, all
provisioned through the same lifecycle; each member's failure shows on that member."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from provisioning import lifecycle
from tests.fakes import fake_backend
from tests.support import (
    Worker,
    api_events,
    docker_containers,
    lifecycle_queue,
    service_env,
    wait_for,
)
from workspaces import services
from workspaces.manifests import templates
from workspaces.models import Workspace
from workspaces.services import team_member_names
from workspaces.status import EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
TEAM = "team-default"
KEY = {"ANTHROPIC_API_KEY": "sk-test-not-a-real-key"}


def _members() -> tuple[str, ...]:
    template = templates().get(TEAM)
    assert template is not None
    return template.members


def test_member_names_are_team_dash_member_numbered_when_repeated() -> None:
    assert team_member_names("sq", ("a", "b", "b")) == ["sq-a", "sq-b-1", "sq-b-2"]


@pytest.mark.django_db
def test_post_team_creates_parent_and_members_in_one_response(api, user) -> None:
    response = api.post(
        "/api/teams/", {"name": "squad", "template": TEAM, "env": KEY}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    parent = body["parent"]
    assert parent["name"] == "squad"
    assert parent["template"] == TEAM
    assert parent["runtime"] == "shell"
    assert parent["parent"] is None
    assert parent["status"] == S.PROVISIONING
    members = body["members"]
    assert [m["name"] for m in members] == team_member_names("squad", _members())
    assert [m["template"] for m in members] == list(_members())
    assert {m["parent"] for m in members} == {parent["id"]}
    assert {m["status"] for m in members} == {S.PROVISIONING}
    assert "env" not in parent and all("env" not in m for m in members)
    rows = Workspace.objects.filter(owner=user)
    assert rows.count() == 1 + len(_members())
    assert all(row.env.reveal() == KEY for row in rows)  # the team's env reaches every member
    children = rows.get(id=parent["id"]).members.values_list("id", flat=True)
    assert {str(child) for child in children} == {m["id"] for m in members}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/api/teams/", {"name": "t", "template": "shell-default"}, "template"),
        ("/api/teams/", {"name": "t", "template": "no-such-team"}, "template"),
        ("/api/teams/", {"name": "t", "template": TEAM, "env": {"A": 1}}, "env"),
        ("/api/teams/", {"name": "Bad Name", "template": TEAM}, "name"),
        ("/api/teams/", {"name": "x" * 60, "template": TEAM}, "name"),
        ("/api/workspaces/", {"name": "t", "template": TEAM}, "template"),
    ],
)
def test_bad_team_requests_are_400_naming_the_field(api, path, payload, field) -> None:
    response = api.post(path, payload, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"], response.json()
    assert Workspace.objects.count() == 0


@pytest.mark.django_db
def test_a_member_name_clash_creates_nothing(api) -> None:
    taken = team_member_names("squad", _members())[-1]
    assert (
        api.post(
            "/api/workspaces/", {"name": taken, "template": "shell-default"}, format="json"
        ).status_code
        == 201
    )
    response = api.post("/api/teams/", {"name": "squad", "template": TEAM}, format="json")
    assert response.status_code == 400
    assert taken in response.json()["detail"]
    assert list(Workspace.objects.values_list("name", flat=True)) == [taken]


@pytest.mark.django_db
def test_each_member_goes_through_the_lifecycle_and_fails_on_its_own(user) -> None:
    with fake_backend() as fake:
        # No ANTHROPIC_API_KEY: the claude-code members cannot start, the others can.
        team = services.create_team(owner=user, name="squad", template=TEAM, backend="fake")
        for workspace in [team.parent, *team.members]:
            lifecycle.converge(workspace.id)
        by_template: dict[str, list[Workspace]] = {}
        for workspace in team.members:
            workspace.refresh_from_db()
            by_template.setdefault(workspace.template, []).append(workspace)
        for template in ("claude-code-default", "claude-code-reviewer"):
            [member] = by_template[template]
            assert member.status == S.FAILED
            assert "ANTHROPIC_API_KEY" in member.last_error
            [failure] = member.events.filter(type=EventType.PROVISION_FAILED)
            assert failure.source == EventSource.PREFLIGHT
            assert fake.calls_for(member.id) == []  # preflight never calls the backend
        started = [team.parent, *by_template["shell-default"], *by_template["hermes-default"]]
        for workspace in started:
            workspace.refresh_from_db()
            assert workspace.status == S.PROVISIONING
            assert workspace.last_error == ""
            assert str(workspace.id) in fake.running
        assert len(fake.running) == 5


# --- end to end on Docker -----------------------------------------------------------------------
def _team_statuses(api: Any, body: dict) -> dict[str, dict]:
    out = {}
    for workspace in [body["parent"], *body["members"]]:
        response = api.get(f"/api/workspaces/{workspace['id']}/")
        assert response.status_code == 200
        out[workspace["name"]] = response.json()
    return out


@pytest.mark.e2e
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_team_of_seven_comes_online_on_docker(api, on_docker, docker_engine, platform_url) -> None:
    response = api.post(
        "/api/teams/", {"name": "crew", "template": TEAM, "env": KEY}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert len(body["members"]) == 6

    def all_online() -> dict | None:
        statuses = _team_statuses(api, body)
        assert not [s for s in statuses.values() if s["status"] == S.FAILED], statuses
        return statuses if all(s["status"] == S.ONLINE for s in statuses.values()) else None

    statuses = wait_for(all_online, timeout=90, interval=0.5, message="the team online")
    for workspace in statuses.values():
        assert workspace["is_running"] is True
        assert workspace["backend"] == "docker"
        [container] = docker_containers(docker_engine, workspace["id"])
        assert container.status == "running"
    for workspace in statuses.values():
        assert api.delete(f"/api/workspaces/{workspace['id']}/").status_code == 202
    wait_for(
        lambda: all(s["status"] == S.REMOVED for s in _team_statuses(api, body).values()),
        timeout=60,
        message="the team removed",
    )


DEAD_QUEUE = "lifecycle-dead-engine"


@pytest.fixture
def dead_engine_worker(worker_env: dict[str, str], settings: Any, tmp_path: Any) -> Iterator[Any]:
    """A worker whose DOCKER_HOST points at an engine that is not running, alone on its queue."""
    env = service_env(
        worker_env["PLATFORM_URL"],
        WORKSPACE_BACKEND="docker",
        DOCKER_HOST=f"unix://{tmp_path}/stopped-engine.sock",
        CELERY_LIFECYCLE_QUEUE=DEAD_QUEUE,
    )
    worker = Worker(env, concurrency=2, name="dead-engine", queues=DEAD_QUEUE).start()
    settings.WORKSPACE_BACKEND = "docker"
    try:
        with lifecycle_queue(DEAD_QUEUE):
            yield worker
    finally:
        worker.stop()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_team_on_a_stopped_engine_fails_all_seven_at_once(api, dead_engine_worker) -> None:
    response = api.post(
        "/api/teams/", {"name": "stranded", "template": TEAM, "env": KEY}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()

    def all_failed() -> dict | None:
        statuses = _team_statuses(api, body)
        return statuses if all(s["status"] == S.FAILED for s in statuses.values()) else None

    # No beat runs in this test: only the cycle itself can have failed them.
    statuses = wait_for(all_failed, timeout=60, interval=0.2, message="the team failed")
    assert len(statuses) == 7
    for workspace in statuses.values():
        assert workspace["is_running"] is False
        assert "workspace backend 'docker' is unavailable" in workspace["last_error"]
        assert "cannot reach the Docker engine" in workspace["last_error"]
        assert "stopped-engine.sock" in workspace["last_error"]
        failures = [
            e for e in api_events(api, workspace["id"]) if e["type"] == EventType.PROVISION_FAILED
        ]
        assert [(f["source"], f["payload"]["backend"]) for f in failures] == [
            (EventSource.BACKEND, "docker")
        ]
