"""Under ASGI, every switch from the event loop to a thread (``sync_to_async``) costs a request
CPU. The web listener's middleware runs in sync mode, in one thread per request (the registry
listener's runs on the event loop: tests/project/test_registry_listener.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from asgiref import sync
from django.core.handlers.asgi import ASGIHandler

from project.request_body import RequestBodyLimit


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the sync functions a request ran through ``sync_to_async``."""
    seen: list[str] = []
    original = sync.SyncToAsync.__call__

    async def counted(self: sync.SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(sync.SyncToAsync, "__call__", counted)
    yield seen


def _get(path: str) -> int:
    """One GET through Django's ASGI handler behind the body limit, as the Procfile serves it."""
    application = RequestBodyLimit(ASGIHandler())
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[Mapping[str, Any]] = []
    received = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        try:
            return next(received)
        except StopIteration:
            await asyncio.sleep(3600)  # no disconnect while the request runs
            raise AssertionError("unreachable") from None

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(application(scope, receive, send))
    return int(sent[0]["status"])


def test_the_web_listeners_middleware_runs_in_one_thread(hops: list[str]) -> None:
    assert _get("/healthz") == 200
    # In async mode, each of Django's own middleware (sessions, CSRF, auth, messages, ...) would
    # hop to a thread for its process_request and again for its process_response.
    hooks = [name for name in hops if name.endswith((".process_request", ".process_response"))]
    assert hooks == []
    # The request's start signal, the chain, the views' hooks (CSRF's process_view, which
    # Django's async handler calls), the view and the response's close (the end signal).
    assert len(hops) <= 5, hops
