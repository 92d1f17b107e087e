#!/usr/bin/env python3
"""Workspace agent: runs inside a workspace, registers it with the platform and heartbeats.

Standard library only, so it runs in any image with a Python 3. Configuration comes from the
environment the platform sets: ``WORKSPACE_ID``, ``WORKSPACE_TOKEN``, ``PLATFORM_URL``; optional
``AGENT_HEARTBEAT_SECONDS`` (default 5), ``AGENT_BOOT_DELAY_SECONDS`` (a slow runtime's boot),
``AGENT_IGNORE_SIGTERM`` (for testing slow stops).

Health: each heartbeat carries ``healthy``. The workspace is unhealthy while the file
``AGENT_UNHEALTHY_FILE`` exists (default ``$WORKSPACE_CONFIG_DIR/.unhealthy`` when the config
directory is known), or while ``AGENT_HEALTH_COMMAND`` (optional, run with ``sh -c``) exits
non-zero or takes longer than ``AGENT_HEALTH_TIMEOUT_SECONDS`` (default 5). The platform shows an
unhealthy workspace as ``degraded`` and a healthy one as ``online``.

Activity (the idle auto-stop policy): a heartbeat carries ``active: true`` when the file
``AGENT_ACTIVITY_FILE`` (default ``$WORKSPACE_CONFIG_DIR/.activity``) was touched since the
previous heartbeat. Anything in the workspace (a shell prompt hook, an editor plugin, a job) can
``touch`` it to say "in use".

The app: when ``WORKSPACE_APP_PORT`` is set the agent runs ``WORKSPACE_APP_COMMAND`` (``sh -c``)
or, without one, serves a small page itself on that port (127.0.0.1), and registers only once
``http://127.0.0.1:<port><WORKSPACE_APP_HEALTH_PATH>`` answers below 400; a heartbeat is healthy
only while it still does.

Exit codes: 0 on SIGTERM; 3 when the platform rejects the token (a newer cycle replaced this
one, or the workspace is gone), so a stale instance never lingers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

EXIT_REJECTED = 3
_stop = threading.Event()


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} agent: {message}", flush=True)


def _post(url: str, token: str, body: dict[str, object], timeout: float = 5.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        return exc.code, payload


def _unhealthy_file() -> str | None:
    explicit = os.environ.get("AGENT_UNHEALTHY_FILE")
    if explicit:
        return explicit
    config_dir = os.environ.get("WORKSPACE_CONFIG_DIR")
    return os.path.join(config_dir, ".unhealthy") if config_dir else None


def _activity_file() -> str | None:
    explicit = os.environ.get("AGENT_ACTIVITY_FILE")
    if explicit:
        return explicit
    config_dir = os.environ.get("WORKSPACE_CONFIG_DIR")
    return os.path.join(config_dir, ".activity") if config_dir else None


def _activity_mark() -> float | None:
    path = _activity_file()
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _healthy() -> bool:
    marker = _unhealthy_file()
    if marker and os.path.exists(marker):
        return False
    command = os.environ.get("AGENT_HEALTH_COMMAND")
    if command:
        timeout = float(os.environ.get("AGENT_HEALTH_TIMEOUT_SECONDS", "5"))
        try:
            check = subprocess.run(
                ["sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return check.returncode == 0
    return True


# --- the app ------------------------------------------------------------------------------------
def _app_health_url() -> str | None:
    port = os.environ.get("WORKSPACE_APP_PORT")
    if not port:
        return None
    return f"http://127.0.0.1:{port}{os.environ.get('WORKSPACE_APP_HEALTH_PATH', '/')}"


def _app_answers() -> bool:
    url = _app_health_url()
    if url is None:
        return True
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status < 400)
    except (OSError, ValueError):  # HTTPError (4xx/5xx) is an OSError too
        return False


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = Path(__file__).with_name("index.html").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _start_app() -> subprocess.Popen[bytes] | None:
    port = os.environ.get("WORKSPACE_APP_PORT")
    if not port:
        return None
    command = os.environ.get("WORKSPACE_APP_COMMAND")
    if command:
        _log(f"starting the app on port {port}")
        return subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL)
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _log(f"serving the default page on port {port}")
    return None


def _stop_app(app: subprocess.Popen[bytes] | None) -> None:
    if app is None or app.poll() is not None:
        return
    app.terminate()
    try:
        app.wait(timeout=5)
    except subprocess.TimeoutExpired:
        app.kill()


def _on_sigterm(signum: int, frame: object) -> None:
    _log("SIGTERM received, exiting")
    _stop.set()


def main() -> int:
    workspace_id = os.environ["WORKSPACE_ID"]
    token = os.environ["WORKSPACE_TOKEN"]
    base = os.environ["PLATFORM_URL"].rstrip("/")
    interval = float(os.environ.get("AGENT_HEARTBEAT_SECONDS", "5"))
    boot_delay = float(os.environ.get("AGENT_BOOT_DELAY_SECONDS", "0"))
    if os.environ.get("AGENT_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)

    if boot_delay and _stop.wait(boot_delay):
        return 0
    app = _start_app()
    try:
        return _run(workspace_id, token, base, interval)
    finally:
        _stop_app(app)


def _run(workspace_id: str, token: str, base: str, interval: float) -> int:
    # Online means the app answers too: register only once its health path does. The first
    # checks and retries come quickly (a small app listens within milliseconds; a network link
    # may be wired just after the agent started), then back off.
    delay = 0.05
    while not _app_answers():
        if _stop.wait(delay):
            return 0
        delay = min(delay * 2, 2.0)
    body: dict[str, object] = {"workspace_id": workspace_id}
    delay = 0.05
    while not _stop.is_set():
        try:
            status, payload = _post(f"{base}/api/registry/register", token, body)
        except (OSError, ValueError) as exc:
            status, payload = 0, {"detail": str(exc)}
        if status == 200:
            _log(f"registered workspace {workspace_id}")
            break
        if status in (401, 403, 404, 410):
            _log(f"registration rejected ({status}): {payload.get('detail')}")
            return EXIT_REJECTED
        _log(f"registration not accepted yet ({status}): {payload.get('detail')}")
        _stop.wait(delay)
        delay = min(delay * 2, 5.0)

    was_healthy = True
    activity_seen = _activity_mark()
    while not _stop.wait(interval):
        healthy = _healthy() and _app_answers()
        mark = _activity_mark()
        active = mark is not None and mark != activity_seen
        activity_seen = mark
        if healthy != was_healthy:
            _log("healthy again" if healthy else "reporting unhealthy")
            was_healthy = healthy
        try:
            status, payload = _post(
                f"{base}/api/registry/heartbeat",
                token,
                {**body, "healthy": healthy, "active": active},
            )
        except (OSError, ValueError) as exc:
            _log(f"heartbeat failed: {exc}")
            continue
        if status in (401, 403, 404, 410):
            _log(f"heartbeat rejected ({status}): {payload.get('detail')}")
            return EXIT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
