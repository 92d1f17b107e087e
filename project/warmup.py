"""What a process loads before its first request or cycle instead of during it.

Django imports the URLconf (every view, the admin and DRF's renderers) on a process's first
request, Celery's producer imports kombu's transport on the first task sent, and the live event
streams (``redis.asyncio``) on the first stream opened. Each costs a few hundred milliseconds of
CPU once per process, which the first requests after a start used to wait for: the web processes
load them before they take work. The entry points import this module before Django is set up,
so the application's modules are imported in the functions, which run after it.
"""

from __future__ import annotations

from django.urls import get_resolver

from project.celery import app


def web() -> None:
    """The API processes (``project.asgi``): the URLconf (the live event streams with it), the
    task producer."""
    get_resolver().url_patterns  # noqa: B018 - the property imports the URLconf
    app.producer_pool  # noqa: B018 - the property builds the pool and imports the transport
    events()


def events() -> None:
    """The event publisher alone: the registry listener (``project.registry_asgi``) serves no URL
    of the API and sends no task."""
    import workspaces.event_channel  # noqa: F401
