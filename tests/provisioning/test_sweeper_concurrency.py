"""Overlapping sweeps are harmless: several real processes sweep the same overdue rows at the same
moment, and every row is flipped exactly once (the compare-and-set decides, not a lock)."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg2
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from project.celery import app
from tests.support import REPO, database_url, service_env, wait_for
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.redis_client import get_redis
from workspaces.status import DesiredState, EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus
ROWS = 400
SWEEPERS = 4
SUMMARY = re.compile(
    r"scanned (\d+) in flight, flipped (\d+), skipped (\d+), deferred (\d+), left alone (\d+)"
)


def test_beat_schedule_runs_the_sweep_on_the_sweeps_queue() -> None:
    app.loader.import_default_modules()  # what a worker and beat do at start-up (autodiscover)
    app.finalize()
    entries = [
        entry
        for entry in app.conf.beat_schedule.values()
        if entry["task"] == "provisioning.sweep_provisioning"
    ]
    assert len(entries) == 1
    assert entries[0]["schedule"] == float(settings.SWEEP_PROVISIONING_INTERVAL_SECONDS)
    assert entries[0]["options"]["queue"] == settings.CELERY_SWEEP_QUEUE
    assert "provisioning.sweep_provisioning" in app.tasks
    assert app.conf.task_routes["provisioning.sweep_provisioning"] == {
        "queue": settings.CELERY_SWEEP_QUEUE
    }


def _blocked_sweepers(dsn: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE%%workspaces_workspace%%'"
            )
            return int(cursor.fetchone()[0])
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_concurrent_sweeps_flip_each_row_exactly_once(user: Any) -> None:
    started = timezone.now() - timedelta(minutes=31)
    Workspace.objects.bulk_create(
        Workspace(
            owner=user,
            name=f"race-{i}",
            template="shell-default",
            runtime="shell",
            backend="process",
            status=S.PROVISIONING,
            desired_state=DesiredState.RUNNING,
            generation=1,
            requested_seq=1,
            handled_seq=1,
            provisioning_started_at=started,
        )
        for i in range(ROWS)
    )
    env = service_env("http://127.0.0.1:1")
    procs: list[subprocess.Popen[str]] = []
    # Barrier: while this transaction holds the table in EXCLUSIVE mode, every sweeper can scan
    # (plain SELECT) but blocks at its first UPDATE. All of them have then read every row as
    # overdue; releasing the lock makes them race for the same rows.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("LOCK TABLE workspaces_workspace IN EXCLUSIVE MODE")
        procs = [
            subprocess.Popen(
                [sys.executable, "manage.py", "sweep_provisioning", "--no-lock"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(SWEEPERS)
        ]
        wait_for(
            lambda: _blocked_sweepers(database_url()) == SWEEPERS,
            timeout=60,
            message="every sweeper scanned and is waiting to flip",
        )
    try:
        # Every sweeper's pipes are drained at once: one that logs into a full pipe while it holds
        # a row's lock (an event is logged inside its transaction) would stall the others.
        with ThreadPoolExecutor(len(procs)) as pool:
            outputs = list(pool.map(lambda proc: proc.communicate(timeout=120), procs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    get_redis().delete(settings.CELERY_TASK_DEFAULT_QUEUE)  # the reaps nobody consumes here

    totals = []
    for (out, err), proc in zip(outputs, procs, strict=True):
        assert proc.returncode == 0, err
        match = SUMMARY.search(out)
        assert match, out
        scanned, flipped, skipped, deferred, left_alone = map(int, match.groups())
        assert scanned == ROWS and skipped == 0 and deferred == 0
        assert flipped + left_alone == ROWS  # each tried every row; the CAS said who won
        totals.append(flipped)
    print("flips per sweeper:", totals)
    assert sum(totals) == ROWS
    assert Workspace.objects.filter(status=S.FAILED).count() == ROWS
    events = WorkspaceEvent.objects.filter(
        type=EventType.PROVISION_FAILED, source=EventSource.PROVISION_TIMEOUT_SWEEP
    )
    assert events.count() == ROWS
    assert events.values("workspace_id").distinct().count() == ROWS
    assert max(Workspace.objects.values_list("requested_seq", flat=True)) == 2  # bumped once
