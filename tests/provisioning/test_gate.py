"""The per-workspace gate, fencing and coalescing (ARCHITECTURE.md invariants 2, 3 and 4).

The first part runs against real Redis and PostgreSQL in this process. The second part starts
several real Celery worker processes, real agent processes and the live API server, and checks the
invariants while it samples the backend (the agent processes under /proc and their pid files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test.utils import override_settings
from django.utils import timezone
from redis.exceptions import LockError
from rest_framework.test import APIClient

from provisioning import gate
from tests.support import REPO, Worker, kill_all_instances, service_env, set_celery_conf, wait_for
from workspaces import services
from workspaces.models import AgentToken, Workspace, WorkspaceEvent
from workspaces.redis_client import get_redis
from workspaces.status import EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus


def _workspace(owner: Any, name: str = "gated", template: str = "shell-default") -> Workspace:
    return Workspace.objects.create(
        owner=owner,
        name=name,
        template=template,
        runtime="shell",
        backend="process",
        status=S.PROVISIONING,
        requested_seq=1,
        handled_seq=0,
    )


def _row(workspace_id: Any) -> dict[str, Any]:
    return dict(
        Workspace.objects.filter(id=workspace_id).values(
            "status", "generation", "is_running", "backend_state", "handled_seq", "last_error"
        )[0]
    )


@contextlib.contextmanager
def _lease_ran_out(lease: gate.Lease) -> Iterator[None]:
    """Make ``lease`` behave like the lease of a holder paused past its expiry."""
    lease._stop.set()  # its renewer stops, as it would in a frozen process
    get_redis().delete(gate.gate_key(lease.workspace_id))
    yield


# --- the gate itself ------------------------------------------------------------------------------
def test_a_second_holder_is_turned_away_at_once() -> None:
    workspace_id = uuid.uuid4()
    with gate.hold(workspace_id, "first"):
        assert gate.is_held(workspace_id)
        with pytest.raises(gate.GateBusy), gate.hold(workspace_id, "second"):
            pass
    assert not gate.is_held(workspace_id)
    with gate.hold(workspace_id, "second"):
        assert gate.is_held(workspace_id)


def test_gates_of_different_workspaces_are_independent() -> None:
    with gate.hold(uuid.uuid4(), "a") as first, gate.hold(uuid.uuid4(), "b") as second:
        assert first.confirm() and second.confirm()


def _pttl_ms(workspace_id: Any) -> int:
    return int(get_redis().pttl(gate.gate_key(workspace_id)))  # type: ignore[arg-type]


def _wait_for_renewals(workspace_id: Any, count: int, timeout: float = 60) -> None:
    """Wait until the holder's renewer has reset the key's TTL ``count`` times (a renewal shows
    as the remaining time going up)."""
    seen = {"renewals": 0, "last": _pttl_ms(workspace_id)}

    def renewed() -> bool:
        now = _pttl_ms(workspace_id)
        assert now > 0, "the gate expired while its holder was alive"
        if now > seen["last"]:
            seen["renewals"] += 1
        seen["last"] = now
        return seen["renewals"] >= count

    wait_for(renewed, timeout=timeout, interval=0.05, message=f"{count} lease renewals")


@pytest.mark.slow
def test_the_lease_is_renewed_while_the_cycle_runs(settings: Any) -> None:
    settings.GATE_LEASE_SECONDS = 3
    workspace_id = uuid.uuid4()
    with gate.hold(workspace_id, "slow") as lease:
        acquired = time.monotonic()
        # Renewals every second; enough of them that the first TTL ran out long ago (4 s > 3 s),
        # so only the renewer keeps the gate held.
        _wait_for_renewals(workspace_id, 4)
        assert time.monotonic() - acquired > 3
        assert _pttl_ms(workspace_id) > 0
        assert lease.confirm()
        with pytest.raises(gate.GateBusy), gate.hold(workspace_id, "other"):
            pass


def test_a_holder_whose_lease_ran_out_cannot_release_the_next_holders_gate() -> None:
    workspace_id = uuid.uuid4()
    with (
        gate.hold(workspace_id, "stale") as stale,
        _lease_ran_out(stale),
        gate.hold(workspace_id, "next") as fresh,
    ):
        assert not stale.confirm()
        with pytest.raises(gate.LeaseExpired):
            stale.ensure()
        with pytest.raises(LockError):
            stale.lock.release()  # its token no longer matches: a no-op
        assert gate.is_held(workspace_id)
        assert fresh.confirm()


def test_a_holder_whose_lease_ran_out_lets_go_without_taking_the_next_holders_gate() -> None:
    """Leaving ``hold`` after the lease ran out: the releasing script finds another holder's
    token, so the lock stays theirs; only the stale holder's own record goes."""
    workspace_id = uuid.uuid4()
    stale_hold = gate.hold(workspace_id, "stale")
    stale = stale_hold.__enter__()
    with _lease_ran_out(stale), gate.hold(workspace_id, "next") as fresh:
        stale_hold.__exit__(None, None, None)
        assert gate.is_held(workspace_id)
        assert fresh.confirm()
        assert gate.gates_held_by("stale") == []
        assert [held["workspace_id"] for held in gate.gates_held_by("next")] == [str(workspace_id)]
    assert not gate.is_held(workspace_id)


def test_a_fresh_confirmation_stands_only_until_a_call_begins_or_time_passes() -> None:
    """``ensure(unless_within=...)``: the lifecycle's confirmation before a backend call that
    follows the previous call's confirmation at once. It stands while it is younger than the
    window and no call has begun since; then the gate is asked again, and a lost lease shows."""
    workspace_id = uuid.uuid4()
    with gate.hold(workspace_id, "holder") as lease:
        assert lease.confirm()
        asked = _count_calls(lease.lock, "reacquire")
        lease.ensure(unless_within=60)
        assert asked == []  # no round trip
        # A newer holder took the gate: only a confirmation that asks Redis can tell.
        get_redis().set(gate.gate_key(workspace_id), "a-newer-holder", px=60_000)
        lease.call_begins()
        with pytest.raises(gate.LeaseExpired):
            lease.ensure(unless_within=60)
        assert len(asked) == 1
    with gate.hold(uuid.uuid4(), "holder") as lease:
        assert lease.confirm()
        get_redis().set(gate.gate_key(lease.workspace_id), "a-newer-holder", px=60_000)
        time.sleep(0.05)
        with pytest.raises(gate.LeaseExpired):
            lease.ensure(unless_within=0.04)  # older than the window
        with pytest.raises(gate.LeaseExpired):
            lease.ensure(unless_within=60)  # and a lost lease stays lost


def _count_calls(target: Any, name: str) -> list[None]:
    """Record each call of ``target.name`` (which still runs) in the list returned."""
    calls: list[None] = []
    method = getattr(target, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return method(*args, **kwargs)

    setattr(target, name, counted)
    return calls


@pytest.mark.slow
def test_a_dead_holder_frees_the_gate_within_the_lease(worker_env_base: dict[str, str]) -> None:
    workspace_id = str(uuid.uuid4())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import django, sys, time; django.setup();"
            "from provisioning import gate;"
            "cm = gate.hold(sys.argv[1], 'doomed'); cm.__enter__();"
            "print('held', flush=True); time.sleep(600)",
            workspace_id,
        ],
        cwd=REPO,
        env={**worker_env_base, "GATE_LEASE_SECONDS": "3"},
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        assert gate.is_held(workspace_id)
        _wait_for_renewals(workspace_id, 1)  # the renewer thread is what keeps it held
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # The bound is the key's TTL: what is left of the lease is never more than the lease,
        # and nobody renews it any more; Redis frees it when it runs out.
        remaining = _pttl_ms(workspace_id)
        assert 0 < remaining <= 3000 or not gate.is_held(workspace_id)
        wait_for(lambda: not gate.is_held(workspace_id), timeout=60, message="the gate to free")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_one_retry_is_scheduled_per_busy_workspace() -> None:
    workspace_id = uuid.uuid4()
    assert gate.claim_retry(workspace_id, 2)
    assert not gate.claim_retry(workspace_id, 2)
    gate.release_retry(workspace_id)
    assert gate.claim_retry(workspace_id, 2)


# --- fencing in PostgreSQL --------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_holder_whose_lease_expired_cannot_begin_a_cycle(user: Any) -> None:
    workspace = _workspace(user)
    with (
        gate.hold(workspace.id, "stale") as stale,
        _lease_ran_out(stale),
        gate.hold(workspace.id, "fresh") as fresh,
    ):
        with pytest.raises(services.LeaseLost):
            services.begin_cycle(
                workspace.id, S.PROVISIONING, action="start", still_owner=stale.confirm
            )
        assert _row(workspace.id)["generation"] == 0
        cycle = services.begin_cycle(
            workspace.id, S.PROVISIONING, action="start", still_owner=fresh.confirm
        )
        assert cycle is not None and cycle.generation == 1


@pytest.mark.django_db(transaction=True)
def test_an_overtaken_holder_changes_nothing(user: Any) -> None:
    workspace = _workspace(user)
    old = services.begin_cycle(workspace.id, S.PROVISIONING, action="start")
    assert old is not None
    new = services.begin_cycle(workspace.id, S.PROVISIONING, action="restart")
    assert new is not None and new.generation == old.generation + 1
    token = services.issue_agent_token(workspace.id, new.generation)
    before = _row(workspace.id)

    # Every write the old cycle could still try: each is refused by the row count.
    with pytest.raises(services.LeaseLost):
        services.record_backend_facts(
            workspace.id, old.generation, is_running=True, backend_state={"pid": 1}, started=True
        )
    with pytest.raises(services.LeaseLost):
        services.issue_agent_token(workspace.id, old.generation)
    assert not services.complete_stop(workspace.id, old.generation, old.seq, {})
    assert not services.complete_remove(workspace.id, old.generation)
    assert not services.fail_cycle(
        workspace.id, old.generation, source=EventSource.BACKEND, message="late"
    )
    services.record_error(workspace.id, old.generation, "late")
    assert not services.transition(workspace.id, S.FAILED, expect_generation=old.generation)

    assert _row(workspace.id) == before
    assert list(AgentToken.objects.filter(workspace=workspace).values_list("generation")) == [
        (new.generation,)
    ]
    assert not WorkspaceEvent.objects.filter(
        workspace=workspace, type=EventType.PROVISION_FAILED
    ).exists()
    assert services.authenticate_agent(token) is not None


@pytest.mark.django_db(transaction=True)
def test_the_agent_of_an_older_generation_cannot_register_again(user: Any) -> None:
    workspace = _workspace(user)
    first = services.begin_cycle(workspace.id, S.PROVISIONING, action="start")
    assert first is not None
    old_token = services.issue_agent_token(workspace.id, first.generation)
    agent = APIClient()
    body = {"workspace_id": str(workspace.id)}

    def call(path: str, token: str) -> Any:
        return agent.post(path, body, format="json", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert call("/api/registry/register", old_token).status_code == 200
    assert _row(workspace.id)["status"] == S.ONLINE

    # A restart cycle begins: its token replaces the old one in the transaction that bumps the
    # generation, so there is no moment when the old agent's token still answers.
    second = services.begin_cycle(workspace.id, S.PROVISIONING, action="restart")
    assert second is not None and second.token and second.token != old_token
    assert call("/api/registry/register", old_token).status_code == 401
    assert call("/api/registry/heartbeat", old_token).status_code == 401
    assert _row(workspace.id)["status"] == S.PROVISIONING  # the stale agent changed nothing
    assert call("/api/registry/register", second.token).status_code == 200
    row = _row(workspace.id)
    assert (row["status"], row["generation"]) == (S.ONLINE, second.generation)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status", [s for s in WorkspaceStatus if s not in (S.REMOVING, S.REMOVED)])
@pytest.mark.parametrize("verb", ["stop", "restart", "delete"])
def test_stop_restart_and_delete_are_accepted_in_every_live_status(
    user: Any, api: APIClient, status: WorkspaceStatus, verb: str
) -> None:
    workspace = _workspace(user, name=f"any-{verb}")
    running = status in (S.ONLINE, S.DEGRADED, S.OFFLINE)
    # Test setup only: put the row in the status under test directly.
    Workspace.objects.filter(id=workspace.id).update(
        status=status,
        generation=3,
        handled_seq=1,
        is_running=running,
        last_started_at=django_now() if running else None,
    )
    if verb == "delete":
        response = api.delete(f"/api/workspaces/{workspace.id}/")
    else:
        response = api.post(f"/api/workspaces/{workspace.id}/{verb}/")
    assert response.status_code == 202, response.content
    row = Workspace.objects.get(id=workspace.id)
    assert row.has_pending_intent  # a cycle will act on it
    expected = {"stop": S.STOPPING, "delete": S.REMOVING}.get(verb, status)
    assert row.status == expected


@pytest.mark.django_db
def test_requests_answer_at_once_while_a_cycle_holds_the_gate(user: Any, api: APIClient) -> None:
    """Invariant 2: the HTTP request never waits on the gate. A request path that took or
    waited for the gate would hang or fail here; each records its intent and answers 202."""
    workspace = _workspace(user, name="held")
    with gate.hold(workspace.id, "a-running-cycle"):
        for verb in ("restart", "stop", "start"):
            response = api.post(f"/api/workspaces/{workspace.id}/{verb}/")
            assert response.status_code == 202, (verb, response.content)
        assert api.delete(f"/api/workspaces/{workspace.id}/").status_code == 202
        assert gate.is_held(workspace.id)
    row = Workspace.objects.get(id=workspace.id)
    assert (row.status, row.requested_seq, row.generation) == (S.REMOVING, 5, 0)


@pytest.mark.django_db(transaction=True)
def test_delete_is_accepted_again_while_removing(user: Any, api: APIClient) -> None:
    workspace = _workspace(user)
    Workspace.objects.filter(id=workspace.id).update(status=S.REMOVING, generation=2)
    response = api.delete(f"/api/workspaces/{workspace.id}/")
    assert response.status_code == 202, response.content
    assert Workspace.objects.get(id=workspace.id).status == S.REMOVING
    # Nothing leaves removing but removed: a stop or restart now would undo the delete.
    assert api.post(f"/api/workspaces/{workspace.id}/restart/").status_code == 409


@pytest.mark.django_db(transaction=True)
def test_nothing_is_accepted_once_removed(user: Any, api: APIClient) -> None:
    workspace = _workspace(user)
    Workspace.objects.filter(id=workspace.id).update(status=S.REMOVED)
    for verb in ("stop", "restart", "start"):
        response = api.post(f"/api/workspaces/{workspace.id}/{verb}/")
        assert response.status_code == 409, response.content
        assert "removed" in response.json()["detail"]


def django_now() -> Any:
    from django.utils import timezone

    return timezone.now()


# --- real workers -------------------------------------------------------------------------------
GATE_LEASE = 3
GRACE = 4
RETRY = 1
QUEUE = "gate-tests"
SLOW_TEMPLATE = "slow-stop"
BOOT_TEMPLATE = "slow-boot"


@pytest.fixture(scope="session")
def worker_env_base(django_db_setup: Any, django_db_blocker: Any, live_server: Any) -> dict:
    with django_db_blocker.unblock():
        return service_env(live_server.url)


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped templates plus one whose process ignores SIGTERM (every stop is slow)."""
    directory = tmp_path_factory.mktemp("gate-templates")
    for template in (REPO / "workspace_templates").iterdir():
        shutil.copytree(template, directory / template.name)
    # An agent that takes a second to boot: a duplicate instance (which would find its token
    # stale only when it registers) lives long enough for the sampler to see it.
    (directory / BOOT_TEMPLATE).mkdir()
    (directory / BOOT_TEMPLATE / "config.yaml").write_text(
        "runtime: shell\nenv:\n  AGENT_BOOT_DELAY_SECONDS: '1'\n"
    )
    (directory / SLOW_TEMPLATE).mkdir()
    (directory / SLOW_TEMPLATE / "config.yaml").write_text(
        "runtime: shell\nenv:\n  AGENT_IGNORE_SIGTERM: '1'\n  AGENT_HEARTBEAT_SECONDS: '600'\n"
    )
    with override_settings(WORKSPACE_TEMPLATES_DIR=directory, STOP_GRACE_SECONDS=GRACE):
        yield directory


@pytest.fixture(scope="module")
def gate_workers(worker_env_base: dict[str, str], templates_dir: Path) -> Iterator[list[Worker]]:
    """Three real worker processes (prefork, two children each) on a queue of their own."""
    env = {
        **worker_env_base,
        "WORKSPACE_TEMPLATES_DIR": str(templates_dir),
        "GATE_LEASE_SECONDS": str(GATE_LEASE),
        "GATE_BUSY_RETRY_SECONDS": str(RETRY),
        "STOP_GRACE_SECONDS": str(GRACE),
        "CELERY_LIFECYCLE_QUEUE": QUEUE,
    }
    workers = [Worker(env, concurrency=2, name=f"gate{n}", queues=QUEUE) for n in range(3)]
    # What this process (API, services) enqueues to.
    previous_queue = set_celery_conf("task_default_queue", QUEUE)
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda worker: worker.start(), workers))
        yield workers
    finally:
        set_celery_conf("task_default_queue", previous_queue)
        for worker in workers:
            worker.stop()
            shutil.copy(worker.log_path, Path("/tmp") / f"gate-{worker.name}.log")
        kill_all_instances()


def _agents() -> dict[str, list[int]]:
    """Live (non-zombie) processes per WORKSPACE_ID, read from /proc: what really runs."""
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] in {"Z", "X"}:
            continue
        for item in environ:
            if item.startswith(b"WORKSPACE_ID="):
                found.setdefault(item[13:].decode(), []).append(int(entry.name))
    return found


def _instance_file(workspace_id: Any) -> Path:
    return Path(django_settings.WORKSPACE_DATA_DIR) / str(workspace_id) / "instance.json"


@dataclass
class Sampler:
    """Samples the backend all along: live agent processes per workspace, and the pid files."""

    workspace_ids: list[str]
    samples: int = 0
    overlaps: list[tuple[float, str, list[int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            agents = _agents()
            self.samples += 1
            for workspace_id in self.workspace_ids:
                pids = agents.get(workspace_id, [])
                if len(pids) > 1:
                    self.overlaps.append((time.time(), workspace_id, pids))
            time.sleep(0.01)

    def wait_for_more(self, count: int) -> None:
        """Keep sampling for ``count`` more samples (a late duplicate would show up)."""
        target = self.samples + count
        wait_for(lambda: self.samples >= target, timeout=60, message=f"{count} more samples")

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the sampler did not stop"


def _settled(workspace_id: Any, status: WorkspaceStatus = S.ONLINE) -> bool:
    row = Workspace.objects.get(id=workspace_id)
    assert row.status != S.FAILED, row.last_error
    return (
        row.status == status
        and row.handled_seq == row.requested_seq
        and not gate.is_held(workspace_id)
    )


def _wait_settled(
    workspace_id: Any, status: WorkspaceStatus = S.ONLINE, timeout: float = 60
) -> None:
    wait_for(
        lambda: _settled(workspace_id, status),
        timeout=timeout,
        interval=0.1,
        message=f"workspace {workspace_id} {status} with nothing pending",
    )


def _exactly_one_instance(workspace_id: Any) -> int:
    pids = wait_for(
        lambda: (p := _agents().get(str(workspace_id), [])) and len(p) == 1 and p,
        timeout=15,
        message="exactly one agent process",
    )
    recorded = json.loads(_instance_file(workspace_id).read_text())
    assert pids == [recorded["pid"]]
    row = Workspace.objects.get(id=workspace_id)
    assert row.is_running and row.backend_state["pid"] == recorded["pid"]
    return int(pids[0])


def _cycles(workspace_id: Any) -> list[WorkspaceEvent]:
    return list(
        WorkspaceEvent.objects.filter(workspace_id=workspace_id, type=EventType.PROVISIONING)
    )


def _failures(workspace_id: Any) -> list[Any]:
    return list(
        WorkspaceEvent.objects.filter(
            workspace_id=workspace_id, type=EventType.PROVISION_FAILED
        ).values("source", "payload")
    )


def _online(user: Any, name: str, template: str = "shell-default") -> Workspace:
    workspace = services.create_workspace(owner=user, name=name, template=template)
    _wait_settled(workspace.id)
    _exactly_one_instance(workspace.id)
    return Workspace.objects.get(id=workspace.id)


def _http_restarts(base_url: str, token: str, workspace_id: Any, count: int) -> list[int]:
    def restart(_: int) -> int:
        request = urllib.request.Request(
            f"{base_url}/api/workspaces/{workspace_id}/restart/",
            method="POST",
            headers={"Authorization": f"Token {token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)

    # Ten at a time: enough to overlap, few enough for the shared PostgreSQL's connections.
    with ThreadPoolExecutor(10) as pool:
        return list(pool.map(restart, range(count)))


def _same_hold(first: dict, second: dict) -> bool:
    """Two reads of ``gates_held_by`` describe one hold: same pid, same start (within 1 s)."""
    started = [time.time() - float(record["held_seconds"]) for record in (first, second)]
    return bool(first["pid"] == second["pid"] and abs(started[0] - started[1]) < 1.0)


def _gate_record(workers: list[Worker], workspace_id: Any) -> tuple[Worker, dict] | None:
    for worker in workers:
        for held in gate.gates_held_by(worker.name):
            if held["workspace_id"] == str(workspace_id):
                return worker, held
    return None


def _inspect_gates(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the operator's command, ``celery -A project inspect workspace_gates``, for real."""
    command = [sys.executable, "-m", "celery", "-A", "project", "inspect", "workspace_gates"]
    return subprocess.run(
        [*command, *args],
        cwd=REPO,
        env={**env, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_coalesced(cycles: list[WorkspaceEvent]) -> None:
    """Each cycle answers requests that arrived after the previous one began: none runs twice
    for the same requests (their ``seq`` strictly grows)."""
    seqs = [event.payload["seq"] for event in cycles]
    assert seqs == sorted(set(seqs)), seqs


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_restart_storm_from_http_and_manage_py_runs_one_instance_at_a_time(
    gate_workers: list[Worker], live_server: Any, user: Any
) -> None:
    workspace = _online(user, "storm", BOOT_TEMPLATE)
    token = services.issue_api_token(user)
    env = {**gate_workers[0].env, "DJANGO_SETTINGS_MODULE": "tests.settings"}

    with Sampler([str(workspace.id)]) as sampler:
        commands = [
            subprocess.Popen(
                [sys.executable, "manage.py", "workspace", "restart", str(workspace.id)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(6)
        ]
        statuses = _http_restarts(live_server.url, token, workspace.id, 30)
        outputs = [command.communicate(timeout=300)[0].decode() for command in commands]
        assert statuses == [202] * 30
        assert [command.returncode for command in commands] == [0] * 6, outputs
        _wait_settled(workspace.id)
        pid = _exactly_one_instance(workspace.id)
        sampler.wait_for_more(50)

    assert sampler.samples > 50
    assert sampler.overlaps == [], sampler.overlaps[:5]
    assert _agents().get(str(workspace.id)) == [pid]
    row = Workspace.objects.get(id=workspace.id)
    assert (row.status, row.is_running) == (S.ONLINE, True)
    assert row.requested_seq == 1 + 36
    assert _failures(workspace.id) == []
    cycles = _cycles(workspace.id)
    _assert_coalesced(cycles)
    # 1 provisioning cycle + the restarts, collapsed: nowhere near one cycle per request.
    assert len(cycles) - 1 <= 36 // 3, [event.payload for event in cycles]
    print(f"36 restarts ran {len(cycles) - 1} restart cycles; {sampler.samples} samples")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_restarts_sent_during_one_slow_cycle_cause_at_most_one_more(
    gate_workers: list[Worker], live_server: Any, user: Any
) -> None:
    workspace = _online(user, "slow", SLOW_TEMPLATE)
    token = services.issue_api_token(user)
    generation = workspace.generation

    with Sampler([str(workspace.id)]) as sampler:
        # The scenario needs all 30 requests to land while the slow cycle runs (about GRACE
        # seconds). On a loaded machine they may not: then that attempt proves nothing, so it
        # settles and runs again; the test fails only if it never happened.
        for _attempt in range(3):
            generation = _row(workspace.id)["generation"]
            services.request_restart(workspace.id)
            # The slow cycle has begun: it now waits out the agent that ignores SIGTERM.

            def begun(previous: int = generation) -> bool:
                return bool(
                    _row(workspace.id)["generation"] == previous + 1 and gate.is_held(workspace.id)
                )

            wait_for(begun, timeout=15, message="the slow cycle to begin")
            slow_cycle = generation + 1
            assert _http_restarts(live_server.url, token, workspace.id, 30) == [202] * 30
            during = _row(workspace.id)["generation"] == slow_cycle and gate.is_held(workspace.id)
            _wait_settled(workspace.id)
            _exactly_one_instance(workspace.id)
            if during:
                break
        assert during, "the 30 requests never all arrived during the slow cycle"

    assert sampler.overlaps == [], sampler.overlaps[:5]
    cycles = _cycles(workspace.id)
    after = [event for event in cycles if event.generation > slow_cycle]
    assert len(after) == 1, [(event.generation, event.payload) for event in cycles]
    _assert_coalesced(cycles)
    assert after[0].payload["seq"] == Workspace.objects.get(id=workspace.id).requested_seq
    assert _failures(workspace.id) == []


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_cycle_wedges_nothing(
    gate_workers: list[Worker], live_server: Any, user: Any
) -> None:
    workspace = _online(user, "crash", SLOW_TEMPLATE)
    generation = workspace.generation

    with Sampler([str(workspace.id)]) as sampler:
        services.request_restart(workspace.id)
        found = wait_for(
            lambda: (
                (record := _gate_record(gate_workers, workspace.id))
                and record[1]["generation"] == generation + 1
                and record
            ),
            timeout=15,
            message="a pool child to hold the gate in the slow cycle",
        )
        worker, held = found
        assert held["pid"] in worker.child_pids()
        os.kill(held["pid"], signal.SIGKILL)  # mid-cycle: it is waiting out the slow stop
        killed_at = time.monotonic()
        # The bound: nobody renews the dead holder's lease, and what is left of it is at most
        # GATE_LEASE. Then the redelivered task's busy retry and one cycle finish the request.
        assert _pttl_ms(workspace.id) <= GATE_LEASE * 1000
        # Nothing else was enqueued: only the redelivery of the killed task can finish this.
        _wait_settled(workspace.id, timeout=120)
        recovered_in = time.monotonic() - killed_at
        _exactly_one_instance(workspace.id)

    assert sampler.overlaps == [], sampler.overlaps[:5]
    # The pool saw its child die mid-task (the task is rejected and redelivered, not acked).
    assert "WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)" in worker.log()
    assert _failures(workspace.id) == []
    cycles = _cycles(workspace.id)
    killed, rerun = cycles[-2], cycles[-1]
    assert killed.generation == generation + 1
    # The re-run answers the same request the killed cycle had taken on.
    assert rerun.generation > killed.generation
    assert rerun.payload["seq"] == killed.payload["seq"]
    print(f"recovered {recovered_in:.1f}s after the kill (lease {GATE_LEASE}s)")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_two_workspaces_cycles_run_in_parallel(gate_workers: list[Worker], user: Any) -> None:
    first = _online(user, "par-a", SLOW_TEMPLATE)
    second = _online(user, "par-b", SLOW_TEMPLATE)
    ids = [first.id, second.id]
    windows: dict[Any, list[float]] = {workspace_id: [] for workspace_id in ids}
    generations = {first.id: first.generation, second.id: second.generation}

    with Sampler([str(workspace_id) for workspace_id in ids]) as sampler:
        for workspace_id in ids:
            services.request_stop(workspace_id)

        def observe() -> bool:
            now = time.monotonic()
            for workspace_id in ids:
                row = _row(workspace_id)
                window = windows[workspace_id]
                if not window and row["generation"] > generations[workspace_id]:
                    window.append(now)  # the stop cycle began
                if len(window) == 1 and row["status"] == S.STOPPED:
                    window.append(now)  # ... and ended
            return all(len(window) == 2 for window in windows.values())

        wait_for(observe, timeout=30, interval=0.05, message="both stops to finish")

    (a_begin, a_end), (b_begin, b_end) = windows[first.id], windows[second.id]
    # Each stop takes GRACE seconds; a global lock would run them one after the other.
    assert max(a_begin, b_begin) < min(a_end, b_end), windows
    assert sampler.overlaps == []
    for workspace_id in ids:
        assert _agents().get(str(workspace_id)) is None
        assert _failures(workspace_id) == []


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_inspect_workspace_gates_lists_the_held_gates(
    gate_workers: list[Worker], user: Any
) -> None:
    workspace = _online(user, "inspected", SLOW_TEMPLATE)
    names = ",".join(worker.name for worker in gate_workers)
    # The command must run while the slow stop (about GRACE seconds) holds the gate; on a loaded
    # machine the command's own start-up can outlast it. Such an attempt proves nothing: the
    # workspace is started again and the stop repeated; the test fails if it never overlapped.
    for _attempt in range(3):
        generation = _row(workspace.id)["generation"]
        services.request_stop(workspace.id)

        def holding(previous: int = generation) -> tuple[Worker, dict] | None:
            record = _gate_record(gate_workers, workspace.id)
            moved = _row(workspace.id)["generation"] == previous + 1
            return record if record is not None and moved else None

        before = wait_for(holding, timeout=15, message="the slow stop to hold the gate")
        result = _inspect_gates(gate_workers[0].env, "--json", "-t", "5", "-d", names)
        # Held all along only if it is the same hold (same process, same start): another short
        # hold taken after the stop ended (a route sync, say) is not the one the command saw.
        after = _gate_record(gate_workers, workspace.id)
        still_held = after is not None and _same_hold(before[1], after[1])
        assert result.returncode == 0, result.stdout + result.stderr
        replies = json.loads(result.stdout.strip().splitlines()[-1])
        assert set(replies) == {worker.name for worker in gate_workers}
        listed = [(node, held) for node, reply in replies.items() for held in reply["gates"]]
        ours = [(node, held) for node, held in listed if held["workspace_id"] == str(workspace.id)]
        if ours or still_held:
            break
        _wait_settled(workspace.id, S.STOPPED)
        services.request_start(workspace.id)
        _wait_settled(workspace.id)
    assert len(ours) == 1, (result.stdout, _gate_record(gate_workers, workspace.id))
    node, held = ours[0]
    assert held["generation"] == generation + 1
    assert held["held_seconds"] >= 0
    assert isinstance(held["pid"], int)
    _wait_settled(workspace.id, S.STOPPED)

    # Released gates are no longer listed (the human-readable form runs too).
    result = _inspect_gates(gate_workers[0].env, "-t", "5", "-d", node)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(workspace.id) not in result.stdout
    assert "gates" in result.stdout


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_whole_worker_node_killed_mid_cycle_is_redriven(
    gate_workers: list[Worker], user: Any, settings: Any
) -> None:
    """When the whole node dies its unacked message waits for the visibility timeout; the
    redrive sweep is what brings the workspace back well before that."""
    from provisioning.tasks import redrive_pending

    workspace = _online(user, "node-down", SLOW_TEMPLATE)
    generation = workspace.generation
    settings.REDRIVE_INTERVAL_SECONDS = 1
    with Sampler([str(workspace.id)]) as sampler:
        services.request_restart(workspace.id)
        worker, _ = wait_for(
            lambda: (
                (record := _gate_record(gate_workers, workspace.id))
                and record[1]["generation"] == generation + 1
                and record
            ),
            timeout=15,
            message="a worker to hold the gate in the slow cycle",
        )
        worker.kill()  # the main process and its pool children, mid-cycle
        try:
            assert _pttl_ms(workspace.id) <= GATE_LEASE * 1000  # nobody renews it: bounded
            wait_for(
                lambda: not gate.is_held(workspace.id),
                timeout=60,
                message="the dead node's lease to run out",
            )
            # The redrive sweep takes intents that waited REDRIVE_INTERVAL_SECONDS since the
            # row's last write: wait for that, not for a guessed time.
            wait_for(
                lambda: (
                    timezone.now() - Workspace.objects.get(id=workspace.id).updated_at
                    > timedelta(seconds=settings.REDRIVE_INTERVAL_SECONDS)
                ),
                timeout=30,
                message="the intent to wait past the redrive interval",
            )
            row = Workspace.objects.get(id=workspace.id)
            assert row.has_pending_intent and row.generation == generation + 1
            assert redrive_pending() == 1
            _wait_settled(workspace.id, timeout=2 * GRACE + 20)
            _exactly_one_instance(workspace.id)
        finally:
            worker.start()  # the next tests get their three workers back

    assert sampler.overlaps == [], sampler.overlaps[:5]
    assert _failures(workspace.id) == []
    assert redrive_pending() == 0  # nothing pending any more
