"""Observability end to end: a real Celery worker and beat, real agents, the live server.

The logs come from the agent's real output; /metrics sums what the worker's pool children and
this process counted (PROMETHEUS_MULTIPROC_DIR, see tests/settings.py); /readyz follows a real
worker and a real beat process.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from provisioning import readiness
from tests.support import Beat, wait_for
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.status import WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample's value, 0 when the series is absent (a counter not yet incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: dict, name: str, **labels: str) -> float:
    """The sample's value; the series must be there."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no series {key} in {sorted(k for k in samples if k[0] == name)}"
    return float(samples[key])


def _wait_status(workspace_id: str, status: WorkspaceStatus, timeout: float = 60) -> Workspace:
    def check() -> Workspace | None:
        workspace = Workspace.objects.get(id=workspace_id)
        assert workspace.status != WorkspaceStatus.FAILED, workspace.last_error
        return workspace if workspace.status == status else None

    return wait_for(check, timeout=timeout, message=f"{workspace_id} {status}")


def test_logs_metrics_and_cli_wait_on_a_real_workspace(
    api, client, celery_worker, instances, capsys
) -> None:
    before = scrape(client)
    created = api.post(
        "/api/workspaces/", {"name": "observed", "template": "shell-default"}, format="json"
    ).json()
    workspace_id = created["id"]
    _wait_status(workspace_id, WorkspaceStatus.ONLINE)

    # Logs: the agent's own output, read back through the process backend.
    logs = wait_for(
        lambda: [
            line
            for line in api.get(f"/api/workspaces/{workspace_id}/logs/?tail=50").json()["lines"]
            if f"registered workspace {workspace_id}" in line
        ],
        message="the agent's registration in its output",
    )
    assert logs

    after = scrape(client)
    assert value(after, "workspaces", status="online", backend="process") >= 1
    # Every status and backend has its series, 0 included.
    assert series(after, "workspaces", status="removed", backend="docker") == 0
    # Counted in the worker's pool child, summed through the multiprocess folder.
    provisioned = ("workspace_cycle_duration_seconds_count", {"action": "provision"})
    assert value(after, provisioned[0], outcome="done", **provisioned[1]) == (
        value(before, provisioned[0], outcome="done", **provisioned[1]) + 1
    )
    # Counted where the agent registered (this process's live server).
    to_online = {"runtime": "shell", "backend": "process"}
    assert value(after, "workspace_provision_to_online_seconds_count", **to_online) == (
        value(before, "workspace_provision_to_online_seconds_count", **to_online) + 1
    )
    assert ("celery_queue_length", (("queue", "lifecycle"),)) in after
    assert ("celery_queue_length", (("queue", "sweeps"),)) in after

    # The command line follows the stop to its end, naming the workspace on each line.
    call_command("workspace", "stop", "alice/observed", "--wait", "--timeout", "60")
    out = capsys.readouterr().out
    assert f"alice/observed ({workspace_id}) reached stopped" in out
    assert "WORKSPACE_STOPPED" in out
    stopped = scrape(client)
    assert (
        value(stopped, "workspace_cycle_duration_seconds_count", action="stop", outcome="done")
        == value(after, "workspace_cycle_duration_seconds_count", action="stop", outcome="done") + 1
    )

    # --wait on start: waits for the new cycle's online, not the stale status.
    call_command("workspace", "start", workspace_id, "--wait", "--timeout", "60", "--json")
    captured = capsys.readouterr()
    assert '"status": "online"' in captured.out
    assert "reached online" in captured.err


def test_sweeps_and_reconcile_are_counted(client, celery_worker, user) -> None:
    from project.celery import app

    # A row stuck in provisioning a day past any deadline, with nothing pending: the sweep's.
    stuck = Workspace.objects.create(
        owner=user,
        name="stuck",
        template="shell-default",
        runtime="shell",
        backend="process",
        status=WorkspaceStatus.PROVISIONING,
        generation=1,
        requested_seq=1,
        handled_seq=1,
        provisioning_started_at=timezone.now() - timedelta(days=1),
    )
    flipped = {"sweep": "provisioning", "result": "flipped"}
    before = scrape(client)
    app.send_task("provisioning.reconcile", queue="sweeps")
    app.send_task("provisioning.sweep_provisioning", queue="sweeps")
    wait_for(
        lambda: (
            value(scrape(client), "workspace_reconcile_results_total", result="passes")
            > value(before, "workspace_reconcile_results_total", result="passes")
        ),
        message="a reconcile pass counted",
    )
    wait_for(
        lambda: Workspace.objects.get(id=stuck.id).status == WorkspaceStatus.FAILED,
        message="the stuck row flipped by the sweep",
    )
    wait_for(
        lambda: (
            value(scrape(client), "workspace_sweep_results_total", **flipped)
            == value(before, "workspace_sweep_results_total", **flipped) + 1
        ),
        message="the sweep's flip counted",
    )


WAITED = 0.3  # seconds the gate stays held after the first caller found it busy


def test_gate_waits_are_timed(client) -> None:
    import uuid

    from provisioning import gate

    workspace_id = uuid.uuid4()
    before = scrape(client)
    with gate.hold(workspace_id, holder="first"):
        for _ in range(3):  # three callers find it held: one wait, from the first of them
            with pytest.raises(gate.GateBusy), gate.hold(workspace_id, holder="second"):
                pass
            time.sleep(WAITED / 3)
    with gate.hold(workspace_id, holder="second"):
        pass
    with gate.hold(workspace_id, holder="third"):  # nobody waited for this one
        pass
    after = scrape(client)
    assert value(after, "workspace_gate_wait_seconds_count") == (
        value(before, "workspace_gate_wait_seconds_count") + 1
    )
    waited = value(after, "workspace_gate_wait_seconds_sum") - value(
        before, "workspace_gate_wait_seconds_sum"
    )
    assert WAITED <= waited < WAITED + 5, waited  # from the first busy caller to the next take


def test_readyz_follows_workers_and_beat(client, celery_worker, worker_env, tmp_path) -> None:
    redis = get_redis()
    redis.delete(readiness.BEAT_TICK_KEY)
    readiness.forget()
    # A worker answers, beat never ticked.
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["workers"] == "ok"
    assert checks["beat"].startswith("error: beat has never")

    beat = Beat({**worker_env, "LIVENESS_SWEEP_INTERVAL_SECONDS": "1"}, tmp_path).start()
    try:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=60, message="ready")
    finally:
        beat.stop()
    assert client.get("/healthz").json() == {"status": "ok"}

    # Beat stopped long ago: not ready.
    readiness.record_beat_tick(now=time.time() - 3600)
    late = client.get("/readyz").json()["checks"]["beat"]
    assert late.startswith("error: beat last sent a task")

    # No worker: not ready, and the answer is cached (one ping per READYZ_CACHE_SECONDS).
    readiness.record_beat_tick()
    celery_worker.stop()
    try:
        readiness.forget()
        response = client.get("/readyz")
        assert response.status_code == 503
        # Another session worker (e.g. the Docker one, on its own queue) may still answer; none
        # consumes the lifecycle queue.
        assert response.json()["checks"]["workers"] in (
            "error: no Celery worker answered a ping",
            "error: no Celery worker that answered consumes lifecycle, sweeps",
        )
        assert int(redis.ttl(readiness.WORKERS_KEY)) > 0  # type: ignore[arg-type]
    finally:
        celery_worker.start()
        readiness.forget()
    assert client.get("/readyz").json()["checks"]["workers"] == "ok"
