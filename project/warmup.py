"""What a process loads before its first request or cycle instead of during it.

Django imports the URLconf (every view, the admin and DRF's renderers) on a process's first
request, Celery's producer imports kombu's transport on the first task sent, and the live events
module (``redis.asyncio``) is imported by the first event published. Each costs a few hundred
milliseconds of CPU once per process, which the first requests after a start used to wait for:
the web processes and each Celery worker load them before they take work.
"""

from __future__ import annotations


def web() -> None:
    """The API processes (``project.asgi``): the URLconf, the live events, the task producer."""
    from django.urls import get_resolver

    from project.celery import app

    get_resolver().url_patterns  # noqa: B018 - the property imports the URLconf
    app.producer_pool  # noqa: B018 - the property builds the pool and imports the transport
    events()


def events() -> None:
    """The live events module alone: the registry listener (``project.registry_asgi``) serves no
    URL of the API and sends no task, and a Celery worker's consumer has loaded the transport."""
    import workspaces.live_events  # noqa: F401
