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
    body: dict[str, object] = {"workspace_id": workspace_id}
    delay = 0.2
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
    while not _stop.wait(interval):
        healthy = _healthy()
        if healthy != was_healthy:
            _log("healthy again" if healthy else "reporting unhealthy")
            was_healthy = healthy
        try:
            status, payload = _post(
                f"{base}/api/registry/heartbeat", token, {**body, "healthy": healthy}
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
