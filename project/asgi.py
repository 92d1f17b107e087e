"""The web entry point: ``gunicorn project.asgi:application -k uvicorn_worker.UvicornWorker``.

Two handlers of the same Django project behind one port:

* ``/api/events/stream`` and ``/api/workspaces/{id}/logs/stream/`` go to Django's ASGI
  handler. The view runs briefly in a thread (authentication, the per-user cap), then the
  stream is an async iterator on the event loop: an open stream costs a coroutine and a Redis
  connection (a log stream: a file poll or an engine connection), no thread.
* Everything else is read whole on the event loop (``asgi_support.whole``), then goes to
  Django's WSGI handler in a fixed pool of ``WEB_THREADS`` threads (``asgi_support.in_thread``),
  as gunicorn's ``gthread`` workers ran it: each thread keeps its persistent database connection
  (``CONN_MAX_AGE``), and the API's concurrency per process is the pool's size. Running those
  sync views through Django's ASGI handler instead would start a thread per request
  (``ThreadSensitiveContext``) and open a database connection per request.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

from project import warmup
from project.asgi_support import answer_lifespan, in_thread, whole

_streams = get_asgi_application()
_requests = get_wsgi_application()
warmup.web()
_threads = ThreadPoolExecutor(settings.WEB_THREADS, thread_name_prefix="web")

# Paths whose responses may stay open for minutes.
STREAM_PATHS = frozenset({"/api/events/stream"})
STREAM_PATTERN = re.compile(r"/api/workspaces/[0-9a-fA-F-]{36}/logs/stream/")


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    path = scope.get("path", "")
    if scope["type"] == "http" and (path in STREAM_PATHS or STREAM_PATTERN.fullmatch(path)):
        await _streams(scope, receive, send)
    elif scope["type"] == "http":
        # Whole before a thread gets it: a client that stalls mid-request holds no thread.
        request = await whole(receive, send)
        if request is not None:
            await in_thread(_requests, _threads, scope, request, send)
