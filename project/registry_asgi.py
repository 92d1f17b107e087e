"""The registry listener as it is served: ``gunicorn project.registry_asgi:application -k
uvicorn_worker.UvicornWorker`` (the ``registry`` line of the Procfile).

Workspaces can reach this port, so a workspace must not be able to take it away from the others.
Behind a threaded WSGI server it could: a thread reads each request from its socket, and a client
that connects and sends nothing, or headers without their body (or an agent stopped in the middle
of a call), holds that thread until it goes away; a handful of them stopped every agent's
heartbeat. Here the event loop reads every request, headers and body, whatever the number of
connections, and a request is handed to a thread (``REGISTRY_THREADS``, each with its own
database connection, as gunicorn's ``--threads`` ran it) only once it is whole: a body that does
not arrive within ``REQUEST_BODY_SECONDS`` is answered 408 and one larger than
``API_MAX_BODY_BYTES`` 413, from the event loop (``project.asgi_support.whole``). What the
thread runs is ``project.registry_wsgi.application``: the common heartbeat's one statement
(``beat_reply``), else the agent endpoints and nothing else.
"""

from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from a2wsgi.wsgi import build_environ
from django.conf import settings

from project import registry_wsgi
from project.asgi_support import answer_lifespan, whole

# The listener's threads (REGISTRY_THREADS), each with its own database connection, running
# ``registry_wsgi.application`` with the body already whole: one hop from the event loop and one
# back, where the WSGI bridge (a2wsgi) takes several per request.
_threads = ThreadPoolExecutor(settings.REGISTRY_THREADS, thread_name_prefix="registry")

Response = tuple[int, list[tuple[bytes, bytes]], bytes]


def _respond(environ: dict[str, Any]) -> Response:
    """``registry_wsgi.application`` on a thread: its status, headers and body (the agent
    endpoints answer small JSON, never a stream)."""
    started: list[Any] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return chunks.append

    result = registry_wsgi.application(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()  # Django's request_finished: the thread's connection ages as for any request
    status, headers = started
    encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    return int(status.split()[0]), encoded, b"".join(chunks)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return  # no websockets here
    request = await whole(receive, send)
    if request is None:
        return
    environ: dict[str, Any] = dict(build_environ(scope, io.BytesIO(request[0])))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    status, headers, content = await loop.run_in_executor(_threads, _respond, environ)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
