"""``GET /api/workspaces/{id}/logs/stream/``: the API's behaviour on the fake backend (which
implements ``follow_logs`` like the real ones): the tail, then new lines and instance changes as
the backend reports them; owner scoping; the bounds (per-user streams, line size, duration);
4xx naming the field; 503 when the backend or Redis cannot be asked. The real followers are
tested in tests/provisioning/test_follow_logs.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from portal import live_events
from tests.conftest import client_for
from tests.fakes import FakeBackend, fake_backend
from workspaces import services

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake(settings: Any) -> Iterator[FakeBackend]:
    settings.LOGS_FOLLOW_POLL_MS = 50
    # A guard against a test that would otherwise wait forever, not a timing assertion.
    settings.LOGS_STREAM_MAX_SECONDS = 60
    with fake_backend() as backend:
        yield backend


def _workspace(owner: Any, fake: FakeBackend, lines: list[str], name: str = "talky") -> Any:
    workspace = services.create_workspace(
        owner=owner, name=name, template="shell-default", backend="fake"
    )
    fake.output[str(workspace.id)] = list(lines)
    fake.running[str(workspace.id)] = 1
    return workspace


def _frames(response: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, data) of each SSE frame after the opening one, which is read at once: the
    stream (and its follower) has started when this returns."""
    chunks = iter(response.streaming_content)
    assert b"stream open" in next(chunks)
    return _parse(chunks)


def _parse(chunks: Iterator[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    for chunk in chunks:
        event, data = "message", None
        for line in chunk.decode().splitlines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
        if data is not None:
            yield event, data


def _close(response: Any) -> None:
    """Leave a stream as a client does: close its iterator. (``response.close()`` would also
    end the request, which closes the test's database connection.) The test client's wrapper
    around the iterator ends the request without that when it is closed."""
    for closer in list(response._resource_closers):
        closer()


def _url(workspace: Any, query: str = "") -> str:
    return f"/api/workspaces/{workspace.id}/logs/stream/{query}"


def test_tail_then_new_lines_then_instance_changes(api, user, fake) -> None:
    workspace = _workspace(user, fake, [f"line {n}" for n in range(10)])
    response = api.get(_url(workspace, "?tail=3"))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    frames = _frames(response)
    assert [next(frames) for _ in range(3)] == [
        ("message", {"line": f"line {n}", "truncated": False}) for n in (7, 8, 9)
    ]
    assert live_events.open_streams(user.pk, "log") == 1
    assert live_events.open_streams(user.pk, "event") == 0  # places of their own

    fake.output[str(workspace.id)].append("written later")
    assert next(frames) == ("message", {"line": "written later", "truncated": False})

    fake.running[str(workspace.id)] = 2  # a new cycle's instance
    assert next(frames) == ("instance", {"change": "restarted", "detail": "generation 2"})
    fake.output[str(workspace.id)].append("from the new instance")
    assert next(frames) == ("message", {"line": "from the new instance", "truncated": False})

    del fake.running[str(workspace.id)]
    assert next(frames) == ("instance", {"change": "gone", "detail": "the instance stopped"})
    _close(response)
    assert live_events.open_streams(user.pk, "log") == 0


def test_a_stream_ends_after_its_maximum_duration_with_an_end_frame(api, user, fake, settings):
    settings.LOGS_STREAM_MAX_SECONDS = 1
    workspace = _workspace(user, fake, ["only line"])
    frames = list(_frames(api.get(_url(workspace))))
    assert frames[0] == ("message", {"line": "only line", "truncated": False})
    assert frames[-1] == ("end", {"reason": "max_seconds", "detail": ""})
    assert live_events.open_streams(user.pk, "log") == 0


def test_lines_are_cut_to_the_line_bound(api, user, fake, settings) -> None:
    settings.LOGS_STREAM_MAX_LINE_BYTES = 64
    workspace = _workspace(user, fake, ["x" * 5000, "short"])
    frames = _frames(api.get(_url(workspace, "?tail=2")))
    assert next(frames) == ("message", {"line": "x" * 64, "truncated": True})
    assert next(frames) == ("message", {"line": "short", "truncated": False})


def test_tail_zero_sends_only_new_lines(api, user, fake) -> None:
    workspace = _workspace(user, fake, ["old"])
    frames = _frames(api.get(_url(workspace, "?tail=0")))
    fake.output[str(workspace.id)].append("new")
    assert next(frames) == ("message", {"line": "new", "truncated": False})


def test_a_workspace_without_an_instance_says_so(api, user, fake) -> None:
    workspace = _workspace(user, fake, [])
    del fake.running[str(workspace.id)]
    frames = _frames(api.get(_url(workspace)))
    assert next(frames) == ("instance", {"change": "gone", "detail": "no instance"})
    fake.running[str(workspace.id)] = 1
    assert next(frames) == ("instance", {"change": "started", "detail": "generation 1"})


def test_owner_scoped_and_bad_parameters_name_the_field(api, user, other_user, fake, settings):
    workspace = _workspace(user, fake, ["secret output"])
    assert client_for(other_user).get(_url(workspace)).status_code == 404
    unknown = api.get(f"/api/workspaces/{uuid.uuid4()}/logs/stream/")
    assert unknown.status_code == 404
    assert unknown["Content-Type"] == "application/json"
    for bad in ("?tail=-1", "?tail=x", f"?tail={settings.LOGS_MAX_TAIL + 1}"):
        response = api.get(_url(workspace, bad), HTTP_ACCEPT="text/event-stream")
        assert response.status_code == 400, bad
        assert response["Content-Type"] == "application/json"
        assert "tail" in response.json()["errors"], bad
    from rest_framework.test import APIClient

    assert APIClient().get(_url(workspace)).status_code == 401
    # Staff see every workspace's output.
    staff = client_for(_staff(user))
    frames = _frames(staff.get(_url(workspace, "?tail=1")))
    assert next(frames) == ("message", {"line": "secret output", "truncated": False})


def _staff(user: Any) -> Any:
    from django.contrib.auth.models import User

    staff = User.objects.create_user("operator", password="x-password-123", is_staff=True)
    return staff


def test_at_most_the_per_user_number_of_open_log_streams(api, user, fake, settings) -> None:
    settings.LOGS_STREAMS_PER_USER = 2
    workspace = _workspace(user, fake, ["a"])
    open_ones = [api.get(_url(workspace)) for _ in range(2)]
    frames = [_frames(response) for response in open_ones]
    for each in frames:
        assert next(each)[1]["line"] == "a"
    refused = api.get(_url(workspace))
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert "log streams" in refused.json()["detail"]
    # Event streams have places of their own.
    assert live_events.open_streams(user.pk, "event") == 0
    _close(open_ones[0])
    assert live_events.open_streams(user.pk, "log") == 1
    again = api.get(_url(workspace))
    assert again.status_code == 200
    _close(again)
    _close(open_ones[1])


def test_an_unreachable_backend_is_a_json_503(api, user, fake) -> None:
    workspace = _workspace(user, fake, ["a"])
    fake.unavailable = "engine down"
    response = api.get(_url(workspace))
    assert response.status_code == 503
    assert "engine down" in response.json()["detail"]
    assert live_events.open_streams(user.pk, "log") == 0


def test_a_backend_that_fails_mid_stream_ends_it_with_the_reason(api, user, fake) -> None:
    workspace = _workspace(user, fake, [])
    del fake.running[str(workspace.id)]
    response = api.get(_url(workspace, "?tail=0"))
    frames = _frames(response)
    assert next(frames)[0] == "instance"
    fake.unavailable = "the engine went away"
    event, data = next(frames)
    assert (event, data["reason"]) == ("end", "error")
    assert "the engine went away" in data["detail"]
    assert list(frames) == []  # the last frame
    assert live_events.open_streams(user.pk, "log") == 0
