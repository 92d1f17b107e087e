"""The lifecycle's orchestration, on a fake backend that implements the real contract."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from provisioning import lifecycle
from provisioning.backends.base import BackendError
from tests.fakes import FakeBackend, fake_backend
from workspaces import services
from workspaces.manifests import templates
from workspaces.models import Workspace
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    with fake_backend() as backend:
        yield backend


def _create(user, template: str = "shell-default", env: dict | None = None) -> Workspace:
    return services.create_workspace(
        owner=user, name=f"w-{uuid.uuid4().hex[:8]}", template=template, env=env, backend="fake"
    )


def _failures(workspace: Workspace) -> list:
    return list(workspace.events.filter(type=EventType.PROVISION_FAILED))


def test_provision_starts_one_instance_and_says_running(user, fake) -> None:
    workspace = _create(user)
    assert lifecycle.converge(workspace.id) == ["provision"]
    workspace.refresh_from_db()
    assert workspace.generation == 1
    assert workspace.is_running is True
    assert workspace.last_started_at is not None
    assert workspace.status == WorkspaceStatus.PROVISIONING  # online comes from the agent
    assert workspace.handled_seq == workspace.requested_seq
    assert fake.running == {str(workspace.id): 1}
    env = fake.env[str(workspace.id)]
    assert env["WORKSPACE_ID"] == str(workspace.id)
    assert env["WORKSPACE_TOKEN"]
    assert env["PLATFORM_URL"]
    # Nothing left to do: a second converge runs no cycle.
    assert lifecycle.converge(workspace.id) == []


def test_config_volume_is_populated_on_first_provision(user, fake) -> None:
    workspace = _create(user, template="hermes-default")
    lifecycle.converge(workspace.id)
    files = fake.configs[str(workspace.id)]
    assert "hermes.toml" in files
    assert ".provisioned" in files
    workspace.refresh_from_db()
    assert workspace.config_populated_at is not None
    assert not workspace.events.filter(type=EventType.CONFIG_RECOVERED).exists()


def test_first_provision_writes_the_config_without_reading_it_and_restart_reads_it(
    user, fake
) -> None:
    workspace = _create(user, template="hermes-default")
    lifecycle.converge(workspace.id)
    assert fake.calls_for(workspace.id) == ["prepare", "write_config", "start"]
    services.request_restart(workspace.id)
    fake.calls.clear()
    assert lifecycle.converge(workspace.id) == ["restart"]
    # Populated by a finished cycle: read, found provisioned, left alone.
    assert fake.calls_for(workspace.id) == ["stop", "prepare", "config_state", "start"]
    assert not workspace.events.filter(type=EventType.CONFIG_RECOVERED).exists()


@pytest.mark.django_db(transaction=True)
def test_a_first_provision_writes_the_database_in_two_transactions(user, fake) -> None:
    """The cycle's begin (generation, status, event and the agent token) and its end (what the
    backend said, the seq it answers and config_populated_at): nothing in between."""
    workspace = _create(user, template="hermes-default")
    with CaptureQueriesContext(connection) as queries:
        assert lifecycle.converge(workspace.id) == ["provision"]
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    writes = [sql for sql in statements if sql in ("INSERT", "UPDATE", "DELETE", "WITH")]
    # begin: UPDATE the row, replace the token (one upsert), INSERT the event; end: UPDATE the row
    assert writes == ["UPDATE", "INSERT", "INSERT", "UPDATE"], statements
    assert statements.count("COMMIT") == 1  # the end is one autocommitted UPDATE
    # The end's UPDATE found no newer request: the loop does not read the row again.
    assert statements[-1] == "UPDATE" and statements.count("SELECT") == 2, statements
    workspace.refresh_from_db()
    assert workspace.config_populated_at == workspace.last_started_at
    assert workspace.tokens.get().generation == workspace.generation


def test_first_provision_after_an_interrupted_one_rewrites_the_config(user, fake) -> None:
    workspace = _create(user, template="hermes-default")
    # What a cycle killed after writing some files (and no marker) leaves behind.
    fake.configs[str(workspace.id)] = {"hermes.toml": b"half"}
    lifecycle.converge(workspace.id)
    files = fake.configs[str(workspace.id)]
    assert files["hermes.toml"] != b"half" and ".provisioned" in files
    workspace.refresh_from_db()
    assert workspace.config_populated_at is not None
    assert not workspace.events.filter(type=EventType.CONFIG_RECOVERED).exists()


def test_restart_that_finds_the_volume_empty_recovers_it(user, fake) -> None:
    workspace = _create(user, template="hermes-default")
    lifecycle.converge(workspace.id)
    fake.configs[str(workspace.id)] = {}
    services.request_restart(workspace.id)
    assert lifecycle.converge(workspace.id) == ["restart"]
    assert ".provisioned" in fake.configs[str(workspace.id)]
    recovered = workspace.events.get(type=EventType.CONFIG_RECOVERED)
    assert recovered.payload == {"template": "hermes-default", "fallback": False}
    assert not _failures(workspace)


def test_preflight_fails_at_once_and_never_calls_the_backend(user, fake) -> None:
    workspace = _create(user, template="claude-code-default", env={"UNRELATED": "value-1"})
    lifecycle.converge(workspace.id)
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert "ANTHROPIC_API_KEY" in workspace.last_error
    assert "UNRELATED" not in workspace.last_error
    assert fake.calls_for(workspace.id) == []
    [failure] = _failures(workspace)
    assert failure.source == EventSource.PREFLIGHT
    assert failure.payload["missing_env"] == ["ANTHROPIC_API_KEY"]
    assert "value-1" not in str(failure.payload)


def test_unavailable_backend_fails_at_once_naming_it(user, fake) -> None:
    fake.unavailable = "engine socket refused"
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert "'fake'" in workspace.last_error
    assert "engine socket refused" in workspace.last_error
    [failure] = _failures(workspace)
    assert failure.source == EventSource.BACKEND


def test_unknown_backend_fails_at_once(user) -> None:
    workspace = services.create_workspace(
        owner=user, name="nowhere", template="shell-default", backend="kubernetes"
    )
    lifecycle.converge(workspace.id)
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert "kubernetes" in workspace.last_error


def test_backend_error_fails_and_leaves_nothing_running(user, fake) -> None:
    fake.fail_start = BackendError("image workspace-agent:dev not found")
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert workspace.is_running is False
    assert "image workspace-agent:dev not found" in workspace.last_error
    assert str(workspace.id) not in fake.running
    assert _failures(workspace)[0].source == EventSource.BACKEND


def test_restart_replaces_the_instance_with_a_new_generation(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_restart(workspace.id)
    assert lifecycle.converge(workspace.id) == ["restart"]
    assert fake.running == {str(workspace.id): 2}
    assert fake.calls_for(workspace.id).count("start") == 2


def test_many_requests_between_cycles_collapse_into_one_cycle(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    for _ in range(10):
        services.request_restart(workspace.id)
    assert lifecycle.converge(workspace.id) == ["restart"]
    assert fake.calls_for(workspace.id).count("start") == 2


@pytest.mark.parametrize(
    ("request_during", "done"),
    [
        (services.request_restart, ["provision", "restart"]),
        (services.request_stop, ["provision", "stop"]),
        (services.request_remove, ["provision", "remove"]),
    ],
)
def test_a_request_during_a_cycle_is_answered_in_the_same_hold(
    user, fake, request_during, done
) -> None:
    """The cycle's last write finds the newer request (its seq moved on): the loop reads the row
    again and runs the cycle it asks for, without a second task."""
    workspace = _create(user)

    def once() -> None:
        del fake.during["start"]
        request_during(workspace.id)

    fake.during["start"] = once
    assert lifecycle.converge(workspace.id) == done
    workspace.refresh_from_db()
    assert workspace.handled_seq == workspace.requested_seq
    assert lifecycle.converge(workspace.id) == []


def test_stop_then_start(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_stop(workspace.id)
    assert lifecycle.converge(workspace.id) == ["stop"]
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPED
    assert workspace.is_running is False
    assert fake.running == {}
    services.request_start(workspace.id)
    assert lifecycle.converge(workspace.id) == ["start"]
    workspace.refresh_from_db()
    assert workspace.is_running is True
    assert workspace.generation == 3


def test_stop_requested_before_the_first_cycle_never_starts_anything(user, fake) -> None:
    workspace = _create(user)
    services.request_stop(workspace.id)
    assert lifecycle.converge(workspace.id) == ["stop"]
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.STOPPED
    assert "start" not in fake.calls_for(workspace.id)


def _stuck_and_failed(workspace: Workspace) -> None:
    """What the stuck-provisioning sweep leaves: failed, with "stopped" pending."""
    workspace.refresh_from_db()
    assert workspace.provisioning_started_at is not None
    assert services.fail_stuck_provisioning(
        workspace.id,
        generation=workspace.generation,
        started_at=workspace.provisioning_started_at,
        timeout_secs=1,
        template=workspace.template,
        runtime=workspace.runtime,
    )


def _stopped_before_the_first_cycle(workspace: Workspace) -> None:
    services.request_stop(workspace.id)


def _stopped_then_started(workspace: Workspace) -> None:
    lifecycle.converge(workspace.id)
    services.request_stop(workspace.id)
    lifecycle.converge(workspace.id)
    services.request_start(workspace.id)


def _provisioned_then_stuck(workspace: Workspace) -> None:
    lifecycle.converge(workspace.id)
    _stuck_and_failed(workspace)


# A request that commits after the lifecycle read the row (its plan) and before the cycle locks
# it (begin_cycle) changes what the row asks for. The cycle must not begin on it: it would record
# the newer request as handled (handled_seq = the locked requested_seq) with the wrong work done.
# race: (how the row is set up, the plan read, the request that lands, what runs, the status).
PLAN_RACES = {
    "start after a stop was planned": (
        _stopped_before_the_first_cycle,
        "stop",
        services.request_start,
        ["provision"],
        WorkspaceStatus.PROVISIONING,
    ),
    "stop after a start was planned": (
        _stopped_then_started,
        "start",
        services.request_stop,
        ["stop"],
        WorkspaceStatus.STOPPED,
    ),
    # failed by the stuck sweep ("stopped" pending): the plan is "reap".
    "start after a reap was planned": (
        _provisioned_then_stuck,
        "reap",
        services.request_start,
        ["restart"],
        WorkspaceStatus.PROVISIONING,
    ),
}


@pytest.mark.parametrize("race", sorted(PLAN_RACES))
def test_a_request_between_plan_and_cycle_is_never_answered_by_the_wrong_cycle(
    user, fake, monkeypatch, race
) -> None:
    setup, planned, request, done, status = PLAN_RACES[race]
    workspace = _create(user)
    setup(workspace)
    plan = lifecycle.plan
    seen: list[str] = []

    def plan_then_request(row: Workspace) -> lifecycle.Action | None:
        action = plan(row)
        seen.append(str(action))
        if len(seen) == 1:
            assert action == planned
            request(row.id)  # commits now: after the read, before the cycle's lock
        return action

    monkeypatch.setattr(lifecycle, "plan", plan_then_request)
    assert lifecycle.converge(workspace.id) == done
    assert seen[0] == planned and seen[1] == done[0]  # planned again from the row as it is
    workspace.refresh_from_db()
    assert workspace.status == status
    assert workspace.handled_seq == workspace.requested_seq
    running = status != WorkspaceStatus.STOPPED
    assert workspace.is_running is running
    # What runs is the instance of the cycle that answered the request (and nothing otherwise).
    assert fake.running == ({str(workspace.id): workspace.generation} if running else {})
    assert lifecycle.converge(workspace.id) == []  # nothing pending, nothing swallowed


def test_remove_deletes_backend_resources(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    services.request_remove(workspace.id)
    assert lifecycle.converge(workspace.id) == ["remove"]
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.REMOVED
    assert workspace.desired_state == DesiredState.REMOVED
    assert str(workspace.id) not in fake.running
    assert str(workspace.id) not in fake.configs
    assert workspace.events.filter(type=EventType.REMOVED).count() == 1
    assert lifecycle.converge(workspace.id) == []


def test_remove_while_backend_is_down_waits_in_removing(user, fake) -> None:
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    fake.unavailable = "engine down"
    services.request_remove(workspace.id)
    assert lifecycle.converge(workspace.id) == []
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.REMOVING
    assert "engine down" in workspace.last_error
    assert workspace.has_pending_intent  # the redrive sweep tries again
    fake.unavailable = None
    assert lifecycle.converge(workspace.id) == ["remove"]


def test_a_stale_cycle_writes_nothing(user, fake) -> None:
    """Fencing: a holder whose generation was overtaken changes nothing."""
    workspace = _create(user)
    old = services.begin_cycle(workspace.id, WorkspaceStatus.PROVISIONING, action="provision")
    new = services.begin_cycle(workspace.id, WorkspaceStatus.PROVISIONING, action="restart")
    assert old is not None and new is not None
    with pytest.raises(services.LeaseLost):
        services.record_backend_facts(
            workspace.id, old.generation, is_running=True, backend_state={"x": 1}, started=True
        )
    with pytest.raises(services.LeaseLost):
        services.issue_agent_token(workspace.id, old.generation)
    assert not services.fail_cycle(
        workspace.id, old.generation, source=EventSource.BACKEND, message="late"
    )
    workspace.refresh_from_db()
    assert workspace.generation == new.generation
    assert workspace.status == WorkspaceStatus.PROVISIONING
    assert workspace.backend_state == {}
    assert not _failures(workspace)


def test_an_emptied_volume_is_recovered_from_the_runtime_default_when_its_template_is_gone(
    user, fake, templates_dir
) -> None:
    """Invariant 9: the workspace's own template first, then ``<runtime>-default``."""
    import shutil

    from workspaces.manifests import invalidate_templates

    workspace = _create(user, template="claude-code-reviewer", env={"ANTHROPIC_API_KEY": "k"})
    lifecycle.converge(workspace.id)
    reviewer = fake.configs[str(workspace.id)]["settings.json"]
    shutil.rmtree(templates_dir / "claude-code-reviewer")
    invalidate_templates()
    fake.configs[str(workspace.id)] = {}

    services.request_restart(workspace.id)
    assert lifecycle.converge(workspace.id) == ["restart"]
    files = fake.configs[str(workspace.id)]
    assert ".provisioned" in files
    assert (
        files["settings.json"] == (templates_dir / "claude-code-default/settings.json").read_bytes()
    )
    assert files["settings.json"] != reviewer
    recovered = workspace.events.get(type=EventType.CONFIG_RECOVERED)
    assert recovered.payload == {"template": "claude-code-default", "fallback": True}
    assert not _failures(workspace)
    assert fake.running == {str(workspace.id): 2}


def test_with_no_template_left_the_restart_fails_saying_so_and_nothing_runs(
    user, fake, templates_dir
) -> None:
    import shutil

    from workspaces.manifests import invalidate_templates

    workspace = _create(user, template="hermes-default")
    lifecycle.converge(workspace.id)
    assert str(workspace.id) in fake.running
    shutil.rmtree(templates_dir / "hermes-default")
    invalidate_templates()

    services.request_restart(workspace.id)
    lifecycle.converge(workspace.id)
    workspace.refresh_from_db()
    assert workspace.status == WorkspaceStatus.FAILED
    assert "hermes-default" in workspace.last_error
    assert "no longer exists" in workspace.last_error
    # The old instance is not left running under a row that says failed and not running.
    assert workspace.is_running is False
    assert str(workspace.id) not in fake.running
    assert fake.calls_for(workspace.id).count("start") == 1


def test_agents_heartbeat_at_a_third_of_the_liveness_window_unless_the_template_says(
    user, fake, settings
) -> None:
    """The platform passes its heartbeat interval (derived from LIVENESS_WINDOW_SECONDS by
    default: offline after three missed beats); a template's env may set its own."""
    settings.AGENT_HEARTBEAT_SECONDS = 10.0
    workspace = _create(user)
    lifecycle.converge(workspace.id)
    assert fake.env[str(workspace.id)]["AGENT_HEARTBEAT_SECONDS"] == "10"

    settings.AGENT_HEARTBEAT_SECONDS = 2.5
    lifecycle.converge(services.request_restart(workspace.id).id)
    assert fake.env[str(workspace.id)]["AGENT_HEARTBEAT_SECONDS"] == "2.5"

    template = templates().get("shell-default")
    assert template is not None
    own = dataclasses.replace(template, env={**template.env, "AGENT_HEARTBEAT_SECONDS": "0.3"})
    assert lifecycle.launch_env(workspace, {}, own, 1)["AGENT_HEARTBEAT_SECONDS"] == "0.3"


def test_the_default_heartbeat_interval_is_a_third_of_the_window() -> None:
    name = "AGENT_HEARTBEAT_SECONDS"
    env = {key: value for key, value in os.environ.items() if key != name}
    for window, interval in (("30", "10.0"), ("60", "20.0"), ("2", "0.7")):
        shown = subprocess.run(
            [
                sys.executable,
                "-c",
                "import project.settings as s; print(s.AGENT_HEARTBEAT_SECONDS)",
            ],
            env={**env, "LIVENESS_WINDOW_SECONDS": window},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert shown == interval, (window, shown)
