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
(``beat_reply``) and a registration that ``register_agent`` accepts (``register_reply``) without
Django's request machinery, else the agent endpoints and nothing else.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.conf import settings

from project import registry_wsgi, warmup
from project.asgi_support import answer_lifespan, in_thread, whole

warmup.events()

# The listener's threads (REGISTRY_THREADS), each with its own database connection.
_threads = ThreadPoolExecutor(settings.REGISTRY_THREADS, thread_name_prefix="registry")


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return  # no websockets here
    request = await whole(receive, send)
    if request is not None:
        await in_thread(registry_wsgi.application, _threads, scope, request, send)
