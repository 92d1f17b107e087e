"""The web entry point: ``gunicorn project.asgi:application -k uvicorn_worker.UvicornWorker``.

Django's own ASGI handler serves every path. Ordinary views are sync: Django runs each request's
sync part in a thread of its own. The event and log streams answer with async iterators on the
event loop, so an open stream holds no thread. In front of Django, ``RequestBodyLimit`` bounds a
request's body in size and time before Django spools it.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# Each request's sync part runs in a thread of its own, so a connection kept per thread
# (CONN_MAX_AGE) would be stranded by every request: connections come from psycopg's pool.
os.environ.setdefault("DATABASE_POOL", "true")
os.environ.setdefault("DATABASE_APPLICATION_NAME", "web")

from django.core.asgi import get_asgi_application

from project import warmup
from project.request_body import RequestBodyLimit

application = RequestBodyLimit(get_asgi_application())
warmup.web()
