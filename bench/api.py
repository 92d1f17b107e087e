"""API latency with 10 000 workspaces in the table, over real HTTP (gunicorn, 2 workers,
keep-alive), and SQL queries per request. Floor: a bare endpoint (`/healthz`) on the same server
in the same run, so the ratio is what the query and serialization add to Django's own cost."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.common import Figure, get_latencies, percentile, print_figures, setup_django, shell_rows
from bench.stack import wait_healthz

ROWS = 10_000
REQUESTS = 200
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed() -> tuple[str, str]:
    from django.contrib.auth import get_user_model

    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    user, _ = get_user_model().objects.get_or_create(username="bench-api")
    if Workspace.objects.filter(owner=user).count() != ROWS:
        Workspace.objects.filter(owner=user).delete()
        statuses = [WorkspaceStatus.STOPPED, WorkspaceStatus.FAILED, WorkspaceStatus.PROVISIONING]
        shell_rows(
            user, [f"bench-{index}" for index in range(ROWS)], tuple(statuses), handled_seq=1
        )
    from workspaces import services

    token = services.issue_api_token(user)
    sample = (
        Workspace.objects.filter(owner=user).order_by("id").values_list("id", flat=True)[ROWS // 2]
    )
    return token, str(sample)


def _queries_per_list(token: str) -> dict[int, int]:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    # The platform's own settings: ALLOWED_HOSTS has no "testserver".
    client = Client(HTTP_AUTHORIZATION=f"Token {token}", HTTP_HOST="127.0.0.1")
    counts = {}
    for size in (10, 50, 200):
        with CaptureQueriesContext(connection) as captured:
            response = client.get(f"/api/workspaces/?page_size={size}")
        assert response.status_code == 200, response.content[:200]
        counts[size] = len(captured.captured_queries)
    return counts


def run(repeats: int) -> list[Figure]:
    setup_django("workspaces_bench_api", redis_db=13)
    token, sample_id = _seed()
    queries = _queries_per_list(token)
    port = _free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "project.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
    )
    try:
        wait_healthz(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        names = ["list p50", "list p95", "retrieve p50", "retrieve p95"]
        results: dict[str, list[float]] = {name: [] for name in names}
        floors: dict[str, list[float]] = {"p50": [], "p95": []}
        get_latencies(conn, "/api/workspaces/", token, REQUESTS)  # warm up both workers and caches
        for _ in range(repeats):
            floor = get_latencies(conn, "/healthz", None, REQUESTS)
            listing = get_latencies(conn, "/api/workspaces/", token, REQUESTS)
            detail = get_latencies(conn, f"/api/workspaces/{sample_id}/", token, REQUESTS)
            floors["p50"].append(percentile(floor, 0.5) * 1000)
            floors["p95"].append(percentile(floor, 0.95) * 1000)
            results["list p50"].append(percentile(listing, 0.5) * 1000)
            results["list p95"].append(percentile(listing, 0.95) * 1000)
            results["retrieve p50"].append(percentile(detail, 0.5) * 1000)
            results["retrieve p95"].append(percentile(detail, 0.95) * 1000)
    finally:
        server.terminate()
        server.wait(timeout=20)
    query_note = ", ".join(f"page size {size}: {count}" for size, count in queries.items())
    figures = []
    for name in names:
        kind = name.split()[1]
        figures.append(
            Figure(
                name=f"{name} ({ROWS} rows, page 50)" if name.startswith("list") else name,
                unit="ms",
                samples=results[name],
                floor_name=f"/healthz {kind}",
                floor_samples=floors[kind],
                notes=f"SQL queries per list request: {query_note}" if name == "list p50" else "",
                extra={"queries": queries},
            )
        )
    return figures


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
