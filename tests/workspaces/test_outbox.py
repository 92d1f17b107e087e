"""A committed intent is never answered 5xx: with the broker down after the commit, requests
answer as usual and the row (requested_seq > handled_seq) is what the redrive sweep enqueues."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import set_celery_conf
from workspaces.models import Workspace

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def broker_down() -> Iterator[None]:
    from project.celery import app

    celery_app: Any = app
    previous = set_celery_conf("broker_url", f"redis://127.0.0.1:{_closed_port()}/0")
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
    try:
        yield
    finally:
        set_celery_conf("broker_url", previous)
        celery_app._pool = None
        celery_app.amqp._producer_pool = None


def test_requests_answer_as_usual_when_the_broker_is_down(api, broker_down) -> None:
    response = api.post(
        "/api/workspaces/", {"name": "outbox", "template": "shell-default"}, format="json"
    )
    assert response.status_code == 201, response.content
    workspace_id = response.json()["id"]
    assert api.post(f"/api/workspaces/{workspace_id}/stop/").status_code == 202
    assert api.post(f"/api/workspaces/{workspace_id}/start/").status_code == 202
    row = Workspace.objects.get(id=workspace_id)
    assert row.requested_seq == 3
    assert row.has_pending_intent  # the outbox: the redrive sweep enqueues it later
    assert api.delete(f"/api/workspaces/{workspace_id}/").status_code == 202


def test_a_lost_database_is_a_503_with_retry_after(rf, settings) -> None:
    from django.db import OperationalError

    from portal.api.middleware import ServiceUnavailableMiddleware

    settings.RETRY_AFTER_SECONDS = 7
    middleware = ServiceUnavailableMiddleware(lambda request: None)
    request = rf.post("/api/workspaces/")
    response = middleware.process_exception(request, OperationalError("server closed"))
    assert response is not None
    assert response.status_code == 503
    assert response["Retry-After"] == "7"
    assert b"retry" in response.content
    assert middleware.process_exception(request, ValueError("a bug")) is None
