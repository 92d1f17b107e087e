"""The registry listener: ``gunicorn project.registry_asgi:application -k
uvicorn_worker.UvicornWorker`` (the ``registry`` line of the Procfile).

It listens where workspaces can connect (``REGISTRY_BIND``, e.g. ``0.0.0.0:8001``: loopback and
the workspaces' links), and ``PLATFORM_URL`` names it. Django's own ASGI handler serves it as the
registry listener (``PLATFORM_LISTENER=registry``: the agents' endpoints alone, see
project/settings/web.py), behind the body limits of the web port (``RequestBodyLimit``).
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("PLATFORM_LISTENER", "registry")
# As project.asgi: each request's sync part runs in a thread of its own, so connections come
# from psycopg's pool.
os.environ.setdefault("DATABASE_POOL", "true")
os.environ.setdefault("DATABASE_APPLICATION_NAME", "registry")

from django.core.asgi import get_asgi_application

from project import warmup
from project.request_body import RequestBodyLimit

application = RequestBodyLimit(get_asgi_application())
warmup.events()
