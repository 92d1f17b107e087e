"""One stuck-provisioning sweep over 10 000 and over 1 000 000 workspace rows, 100 in flight.

Both tables live in one bench database, each in its own PostgreSQL schema migrated by Django
(``bench_10k`` and ``bench_1m``, so index names match production); the connection switches
between them with ``search_path``, which lets the two sweeps alternate side by side in one run.
Rows are built with one ``INSERT ... SELECT generate_series`` each (kept between runs when the
counts already match). The same 100 rows are in flight in both tables: 50 overdue (flipped by each
sweep, then reset untimed) and 50 young (spared). The figure is the 1 000 000-row sweep with the
10 000-row sweep as its floor: the ratio should stay near 1, because the sweep's query reads the
partial index ``ws_provisioning_inflight``, which holds only the rows in flight.

    .venv/bin/python -m bench.sweeper [repeats]

Uses ``SWEEPER_BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/ws_sweeper_bench``)
and ``REDIS_URL`` (default db 14).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from bench.common import Figure, setup_django

SIZES = {"bench_10k": 10_000, "bench_1m": 1_000_000}
IN_FLIGHT = 100
OVERDUE = 50


def _setup() -> None:
    os.environ["DATABASE_URL"] = os.environ.get(
        "SWEEPER_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ws_sweeper_bench"
    )
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
    os.environ.setdefault("GATE_KEY_PREFIX", "bench-wsgate")
    os.environ.setdefault("CELERY_LIFECYCLE_QUEUE", "bench-lifecycle")
    os.environ.setdefault("LOG_LEVEL", "ERROR")  # each flip logs a warning
    setup_django()


def _use(schema: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SET search_path TO {schema}")


def _build(schema: str, rows: int) -> tuple[list[str], float, bool]:
    """Migrate the schema and fill it; returns the in-flight ids, the time taken and whether the
    rows were inserted now (False: kept from an earlier run)."""
    from django.core.management import call_command
    from django.db import connection

    from workspaces.status import DesiredState, WorkspaceStatus

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    _use(schema)
    call_command("migrate", verbosity=0, interactive=False)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM workspaces_workspace")
        have = cursor.fetchone()[0]
        inserted = have != rows
        if inserted:
            cursor.execute("TRUNCATE workspaces_workspaceevent, workspaces_workspace CASCADE")
            cursor.execute("DELETE FROM auth_user")
            cursor.execute(
                "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name,"
                " email, is_staff, is_active, date_joined)"
                " VALUES ('!', false, 'bench', '', '', '', false, true, now()) RETURNING id"
            )
            owner = cursor.fetchone()[0]
            # Settled rows: online (running), stopped, failed, removed, in turn.
            settled = [
                WorkspaceStatus.ONLINE,
                WorkspaceStatus.STOPPED,
                WorkspaceStatus.FAILED,
                WorkspaceStatus.REMOVED,
            ]
            cursor.execute(
                """
                INSERT INTO workspaces_workspace (
                  id, owner_id, name, template, runtime, backend, status, desired_state,
                  is_running, last_started_at, last_heartbeat_at, last_error, generation,
                  requested_seq, handled_seq, provisioning_started_at, config_populated_at,
                  env, backend_state, created_at, updated_at)
                SELECT gen_random_uuid(), %(owner)s, 'ws-' || i,
                  (ARRAY['shell-default', 'hermes-default', 'claude-code-default'])[1 + i %% 3],
                  (ARRAY['shell', 'hermes', 'claude-code'])[1 + i %% 3], 'process',
                  CASE WHEN i <= %(in_flight)s THEN %(provisioning)s
                       ELSE (%(settled)s::text[])[1 + i %% 4] END,
                  %(desired)s,
                  i > %(in_flight)s AND i %% 4 = 0, now() - interval '2 days',
                  now() - interval '1 day', '', 1, 1, 1,
                  CASE WHEN i <= %(in_flight)s THEN now() ELSE now() - interval '2 days' END,
                  now() - interval '2 days', '{}', '{}', now() - interval '3 days', now()
                FROM generate_series(1, %(rows)s) AS i
                """,
                {
                    "owner": owner,
                    "in_flight": IN_FLIGHT,
                    "provisioning": WorkspaceStatus.PROVISIONING.value,
                    "settled": [status.value for status in settled],
                    "desired": DesiredState.RUNNING.value,
                    "rows": rows,
                },
            )
            cursor.execute("ANALYZE workspaces_workspace")
        cursor.execute(
            "SELECT id FROM workspaces_workspace WHERE name = ANY(%s) ORDER BY name",
            [[f"ws-{i}" for i in range(1, IN_FLIGHT + 1)]],
        )
        ids = [str(row[0]) for row in cursor.fetchall()]
    assert len(ids) == IN_FLIGHT
    return ids, time.perf_counter() - started, inserted


def _reset(ids: list[str], overdue: int) -> None:
    """Put the same 100 rows back in flight: the first ``overdue`` past their deadline, the rest
    young (untimed)."""
    from django.db import connection

    from workspaces.redis_client import get_redis
    from workspaces.status import DesiredState, WorkspaceStatus

    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM workspaces_workspaceevent WHERE workspace_id = ANY(%s::uuid[])", [ids]
        )
        cursor.execute(
            """
            UPDATE workspaces_workspace SET status = %s, desired_state = %s, requested_seq = 1,
              handled_seq = 1, last_error = '',
              provisioning_started_at = CASE WHEN id = ANY(%s::uuid[])
                THEN now() - interval '3 hours' ELSE now() END
            WHERE id = ANY(%s::uuid[])
            """,
            [
                WorkspaceStatus.PROVISIONING.value,
                DesiredState.RUNNING.value,
                ids[:overdue],
                ids,
            ],
        )
    from django.conf import settings

    get_redis().delete(settings.CELERY_TASK_DEFAULT_QUEUE)


def _explain() -> str:
    from django.utils import timezone

    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    # The sweeper's scan, as provisioning.sweeper.in_flight_rows builds it.
    query = (
        Workspace.objects.filter(
            status=WorkspaceStatus.PROVISIONING, provisioning_started_at__lte=timezone.now()
        )
        .order_by("provisioning_started_at", "id")
        .values_list("id", "name", "template", "runtime", "generation", "provisioning_started_at")[
            :500
        ]
    )
    return query.explain(analyze=True, buffers=True)


def run(repeats: int = 7) -> list[Figure]:
    _setup()
    from provisioning import sweeper

    built = {schema: _build(schema, rows) for schema, rows in SIZES.items()}
    for schema, (_, seconds, inserted) in built.items():
        how = "inserted" if inserted else "kept from an earlier run"
        print(f"# {schema}: {SIZES[schema]:,} rows {how}, {seconds:.1f} s", file=sys.stderr)
    # (figure, overdue rows): a sweep that flips 50 rows, and one that only scans and judges.
    kinds = {"flip": OVERDUE, "scan": 0}
    samples = {(kind, schema): [] for kind in kinds for schema in SIZES}  # type: ignore[var-annotated]
    order = list(SIZES)
    for repeat in range(repeats + 1):
        for kind, overdue in kinds.items():
            for schema in order if repeat % 2 == 0 else reversed(order):
                _use(schema)
                _reset(built[schema][0], overdue)
                started = time.perf_counter()
                report = sweeper.sweep()
                elapsed = time.perf_counter() - started
                assert report.scanned == IN_FLIGHT, report.summary()
                assert len(report.flipped) == overdue, report.summary()
                if repeat:  # the first round warms caches and connections
                    samples[(kind, schema)].append(elapsed * 1000)
    _use("bench_1m")
    _reset(built["bench_1m"][0], OVERDUE)
    plan = _explain()
    _use("public")
    builds = {schema: round(seconds, 1) for schema, (_, seconds, _) in built.items()}
    return [
        Figure(
            name=f"stuck-provisioning sweep, 1,000,000 rows, {IN_FLIGHT} in flight, "
            f"{OVERDUE} flipped",
            unit="ms",
            samples=samples[("flip", "bench_1m")],
            floor_name="the same sweep over 10,000 rows",
            floor_samples=samples[("flip", "bench_10k")],
            notes="ratio near 1: the scan reads the partial index of in-flight rows only",
            extra={"explain_1m": plan, "build_seconds": builds},
        ),
        Figure(
            name=f"stuck-provisioning sweep, 1,000,000 rows, {IN_FLIGHT} in flight, none overdue",
            unit="ms",
            samples=samples[("scan", "bench_1m")],
            floor_name="the same sweep over 10,000 rows",
            floor_samples=samples[("scan", "bench_10k")],
            notes="scan and judge only: the query's own cost",
        ),
    ]


def main(argv: list[str]) -> None:
    repeats = int(argv[1]) if len(argv) > 1 else 7
    figures = run(repeats)
    for figure in figures:
        print(figure.line())
        explain: Any = figure.extra.get("explain_1m")
        if explain:
            print("EXPLAIN (ANALYZE, BUFFERS) of the sweep's scan over 1,000,000 rows:")
            print(explain)


if __name__ == "__main__":
    main(sys.argv)
