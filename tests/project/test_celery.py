"""The Celery app is the app of every thread (Celery's Django fix-up makes it the default): the
domain enqueues by a task's name through ``celery.current_app``, and a web process serves its
requests on threads of its own."""

from __future__ import annotations

import threading
from typing import Any

from celery import current_app
from django.conf import settings

from project.celery import app


def test_every_thread_enqueues_on_the_projects_app() -> None:
    seen: list[tuple[str | None, Any]] = []
    thread = threading.Thread(
        target=lambda: seen.append((current_app.main, current_app.conf.broker_url))
    )
    thread.start()
    thread.join()
    assert seen == [(app.main, settings.CELERY_BROKER_URL)]
    assert app.main == "project"


def test_threads_share_one_result_backend() -> None:
    # Celery keeps a result backend per thread unless it is marked thread-safe, and makes each
    # one by scanning every installed package's entry points: with a thread per request, that
    # scan was a quarter of the web process's CPU for a create.
    backend = app.backend
    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(app.backend)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [backend] * 3
    assert backend.as_uri() == "disabled://"  # results are never stored
