"""Workspace apps through the proxy: how long from POST to the app answering through Caddy, and
what the proxy (with its forward_auth check) adds to each request, side by side in one run.

Stack: gunicorn (2 workers x 4 threads), one Celery worker (prefork, 2) on the process backend,
and Debian's Caddy managed through its admin API, each on free ports of this machine.

1. **POST -> app through the proxy.** ``POST /api/workspaces/`` (shell-default: the agent serves
   a small page on its allocated port), then ``GET /`` on the workspace host through Caddy with
   the owner's token until it answers 200. Floor, in the same run and for the same workspace:
   POST -> the ``WORKSPACE_ONLINE`` event (the agent registered once its app answered). The
   ratio is what the proxy adds on top (nothing is written to it per workspace: its check reads
   the row, so the app is served from the registration's commit).
2. **Per request.** One online workspace; ``GET /`` through Caddy with ``Authorization: Token``
   (Caddy asks the platform first: one more HTTP round trip and a token lookup in PostgreSQL),
   and the same with the workspace cookie (a signature check and one user lookup), against the
   same ``GET /`` sent to the app's port directly. Each side keeps one connection alive; the
   sides alternate in batches so load on the machine hits them alike.

    .venv/bin/python -m bench.proxy [repeats]
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Figure, print_figures, setup_django
from bench.stack import REPO, free_port, stop, wait_until, write_proxy_config

BATCH = 50


def _get(conn: http.client.HTTPConnection, host: str, headers: dict[str, str]) -> int:
    conn.request("GET", "/", headers={"Host": host, **headers})
    response = conn.getresponse()
    response.read()
    return response.status


def run(repeats: int = 5) -> list[Figure]:
    setup_django("workspaces_bench_proxy", redis_db=12)
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from workspaces import access
    from workspaces.models import Workspace, WorkspaceEvent
    from workspaces.status import EventType

    user, _ = get_user_model().objects.get_or_create(username="bench-proxy")
    from workspaces import services

    token = services.issue_api_token(user)
    web_port, admin_port, proxy_port = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "WORKSPACE_BACKEND": "process",
        "WORKSPACE_DATA_DIR": str(work / "data"),
        "PLATFORM_URL": f"http://127.0.0.1:{web_port}",
        "PLATFORM_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
        "PROXY_ADMIN": f"127.0.0.1:{admin_port}",
        "PROXY_BIND": f"127.0.0.1:{proxy_port}",
        "GATE_KEY_PREFIX": f"bench-proxy-{uuid.uuid4().hex[:6]}",
        "LOG_LEVEL": "WARNING",
        "HOME": str(work),
        "XDG_CONFIG_HOME": str(work),
        "XDG_DATA_HOME": str(work),
    }
    write_proxy_config(env, work / "caddy.json")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        return proc

    def api(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, (json.loads(data) if data else {})

    figures: list[Figure] = []
    try:
        spawn(["caddy", "run", "--config", str(work / "caddy.json")], "caddy")
        spawn(
            [
                *(sys.executable, "-m", "gunicorn", "project.wsgi"),
                *("--bind", f"127.0.0.1:{web_port}", "--workers", "2", "--threads", "4"),
                *("--log-level", "warning"),
            ],
            "gunicorn",
        )
        spawn(
            [
                *(sys.executable, "-m", "celery", "-A", "project", "worker", "-l", "WARNING"),
                *("-P", "prefork", "-c", "2", "-Q", str(settings.CELERY_TASK_DEFAULT_QUEUE)),
                *("-n", f"bench-proxy-{uuid.uuid4().hex[:6]}@%h", "--without-gossip"),
                *("--without-mingle", "--without-heartbeat"),
            ],
            "worker",
        )

        def web_ready() -> bool:
            try:
                return api("GET", "/readyz")[0] == 200
            except OSError:
                return False

        wait_until(web_ready, 60, "gunicorn", interval=0.2)
        proxy_conn = lambda: http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)  # noqa: E731

        # 1. POST -> app answering through the proxy, against POST -> online.
        to_app: list[float] = []
        to_online: list[float] = []
        last: dict[str, Any] = {}
        for index in range(repeats):
            started = time.perf_counter()
            status, body = api(
                "POST", "/api/workspaces/", {"name": f"p{index}", "template": "shell-default"}
            )
            assert status == 201, body
            host = f"p{index}--bench-proxy.{settings.WORKSPACE_DOMAIN}"

            def answered(host: str = host) -> bool:
                try:
                    conn = proxy_conn()
                    ok = _get(conn, host, {"Authorization": f"Token {token}"}) == 200
                    conn.close()
                    return ok
                except OSError:
                    return False

            wait_until(answered, 120, f"workspace p{index} through the proxy", interval=0.01)
            to_app.append(time.perf_counter() - started)
            event = WorkspaceEvent.objects.get(workspace_id=body["id"], type=EventType.ONLINE)
            created = Workspace.objects.get(id=body["id"]).created_at
            to_online.append((event.created_at - created).total_seconds())
            last = body
            if index < repeats - 1:
                api("DELETE", f"/api/workspaces/{body['id']}/")
        figures.append(
            Figure(
                "POST -> app answers through the proxy (process backend)",
                "s",
                to_app,
                floor_name="POST -> WORKSPACE_ONLINE (agent registered, app answering)",
                floor_samples=to_online,
            )
        )

        # 2. Per request: through the proxy (token, cookie) against the app directly.
        workspace = Workspace.objects.select_related("owner").get(id=last["id"])
        host = f"{workspace.name}--bench-proxy.{settings.WORKSPACE_DOMAIN}"
        cookie = f"{settings.WORKSPACE_COOKIE_NAME}={access.cookie_value(user, workspace)}"
        sides = {
            "token": (proxy_conn(), {"Authorization": f"Token {token}"}),
            "cookie": (proxy_conn(), {"Cookie": cookie}),
            "direct": (
                http.client.HTTPConnection("127.0.0.1", int(workspace.app_port or 0), timeout=30),
                {},
            ),
        }
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(max(repeats, 5) * 4):
            for name, (conn, headers) in sides.items():
                started = time.perf_counter()
                for _ in range(BATCH):
                    assert _get(conn, host, headers) == 200
                samples[name].append((time.perf_counter() - started) / BATCH * 1000)
        for name, label in (("token", "Authorization: Token"), ("cookie", "workspace cookie")):
            figures.append(
                Figure(
                    f"GET / through the proxy with {label} (forward_auth per request)",
                    "ms",
                    samples[name],
                    floor_name="GET / to the app's port directly",
                    floor_samples=samples["direct"],
                    notes=f"mean of {BATCH} sequential requests per sample, keep-alive",
                )
            )
        api("DELETE", f"/api/workspaces/{last['id']}/")
        wait_until(
            lambda: not Workspace.objects.exclude(status="removed").filter(owner=user).exists(),
            60,
            "every bench workspace removed",
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
