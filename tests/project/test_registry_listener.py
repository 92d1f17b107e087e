"""The registry listener's Django, as project/registry_asgi.py serves it: every middleware runs
on the event loop (no thread hop around a sync-only one on each heartbeat), and a database it
cannot reach is a JSON 503 with Retry-After, as on the web port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import asyncio, json
from django.conf import settings
from django.utils.module_loading import import_string
from project.registry_asgi import application

sync_only = [
    path for path in settings.MIDDLEWARE
    if not getattr(import_string(path), "async_capable", False)
]
body = json.dumps({"workspace_id": "00000000-0000-0000-0000-000000000001"}).encode()
scope = {
    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
    "scheme": "http", "path": "/api/registry/heartbeat", "raw_path": b"/api/registry/heartbeat",
    "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8001),
    "headers": [
        (b"host", b"10.0.0.1:8001"), (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()), (b"authorization", b"Bearer " + b"a" * 43),
    ],
}
answer = {}

async def call():
    delivered = False
    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(60)
    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            answer["body"] = answer.get("body", "") + message.get("body", b"").decode()
    await application(scope, receive, send)

asyncio.run(call())
print(json.dumps({"sync_only": sync_only, **answer}))
"""


def test_the_registry_listener_runs_its_middleware_on_the_event_loop_and_answers_503() -> None:
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        # Nothing listens on port 1: every connection attempt is refused at once.
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/unreachable",
        "DATABASE_POOL_TIMEOUT": "2",
    }
    environment.pop("PLATFORM_LISTENER", None)  # registry_asgi sets it
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["sync_only"] == []
    assert answer["status"] == 503, answer
    assert answer["headers"]["retry-after"]
    assert "unavailable" in json.loads(answer["body"])["detail"]
