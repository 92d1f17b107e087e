"""Live events: polling with ``after``, publication on commit, and the SSE stream read by a real
HTTP client from the live server while a real worker and real agents produce the events."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
from typing import Any
from urllib.parse import urlparse

import pytest
from django.db import transaction

from portal import live_events
from tests.conftest import client_for
from tests.provisioning.test_reconciler import make_row
from tests.support import wait_for
from workspaces import event_channel, services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.redis_client import get_redis
from workspaces.status import EventSource, EventType, WorkspaceStatus

S = WorkspaceStatus


# --- polling ------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_events_after_returns_only_newer_events(user, other_user, api) -> None:
    workspace = make_row(user, S.ONLINE, backend="process")
    ids = [
        services.record_event(workspace.id, event_type, EventSource.LIFECYCLE, 1).id
        for event_type in (EventType.PROVISIONING, EventType.ONLINE, EventType.STOPPED)
    ]
    url = f"/api/workspaces/{workspace.id}/events/"
    everything = api.get(url).json()["results"]
    assert [event["id"] for event in everything] == ids
    newer = api.get(url, {"after": ids[0]}).json()["results"]
    assert [event["id"] for event in newer] == ids[1:]
    assert [event["type"] for event in newer] == [EventType.ONLINE, EventType.STOPPED]
    assert api.get(url, {"after": ids[-1]}).json()["results"] == []

    bad = api.get(url, {"after": "yesterday"})
    assert bad.status_code == 400
    assert "after" in bad.json()["detail"]
    assert client_for(other_user).get(url).status_code == 404


# --- publication ------------------------------------------------------------------------------
def _next_message(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    # get_message returns None for the (ignored) subscription confirmation too: keep reading.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if message is not None:
            return dict(message)
    return None


@pytest.mark.django_db
def test_events_are_published_after_commit_only(user, django_capture_on_commit_callbacks) -> None:
    workspace = make_row(user, S.ONLINE, backend="process")
    pubsub = get_redis().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(event_channel.owner_channel(user.pk))
    try:
        with django_capture_on_commit_callbacks(execute=True):
            with pytest.raises(RuntimeError), transaction.atomic():
                services.record_event(workspace.id, EventType.DEGRADED, EventSource.AGENT, 1)
                raise RuntimeError("rolled back")
            event = services.record_event(workspace.id, EventType.ONLINE, EventSource.AGENT, 1)
        message = _next_message(pubsub, timeout=5)
        assert message is not None
        data = json.loads(message["data"])
        assert data["id"] == event.id
        assert data["workspace_id"] == str(workspace.id)
        assert (data["type"], data["source"]) == (EventType.ONLINE, EventSource.AGENT)
        # The rolled-back event was never announced.
        assert _next_message(pubsub, timeout=0.5) is None
    finally:
        pubsub.close()


# --- the stream ---------------------------------------------------------------------------------
class StreamReader:
    """A real HTTP client holding ``/api/events/stream`` open, parsing frames in a thread."""

    def __init__(self, base_url: str, token: str, last_event_id: int | None = None) -> None:
        url = urlparse(base_url)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        headers = {"Authorization": f"Token {token}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.conn.request("GET", "/api/events/stream", headers=headers)
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.received: list[dict[str, Any]] = []
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.opened.wait(10), "the stream never opened"

    def _read(self) -> None:
        event_id: str | None = None
        data: list[str] = []
        try:
            while True:
                raw = self.response.readline()
                if not raw:
                    return
                line = raw.decode().rstrip("\n")
                if not line:
                    if data:
                        event = json.loads("\n".join(data))
                        assert event["id"] == int(event_id or -1)
                        self.events.put(event)
                    event_id, data = None, []
                elif line.startswith(":"):
                    self.opened.set()  # the server subscribed before it sent its first line
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "id":
                        event_id = value
                    elif name == "data":
                        data.append(value)
        except (OSError, ValueError):
            return

    def wait_for_event(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            while True:
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break
                self.received.append(event)
            return next((event for event in self.received if predicate(event)), None)

        return wait_for(seen, timeout=timeout, message="an event on the stream")

    def close(self) -> None:
        # The reader ends on the shut socket first: closing the connection under a reader still
        # in readline() would pull its buffer away mid-read (an exception in that thread).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.conn.close()
        self.thread.join(timeout=10)


def _token(user: Any) -> str:
    return services.issue_api_token(user)


def _create(api: Any, name: str) -> str:
    response = api.post("/api/workspaces/", {"name": name, "template": "shell-default"})
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def _status(workspace_id: str) -> WorkspaceStatus:
    return WorkspaceStatus(Workspace.objects.get(id=workspace_id).status)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_stream_shows_own_events_in_order_and_resumes(
    user, other_user, make_user, live_server, celery_worker, instances, settings
) -> None:
    settings.EVENTS_STREAM_KEEPALIVE_SECONDS = 1
    mine_api, theirs_api = client_for(user), client_for(other_user)
    stream = StreamReader(live_server.url, _token(user))
    try:
        mine = _create(mine_api, "mine")
        theirs = _create(theirs_api, "theirs")
        stream.wait_for_event(lambda e: e["workspace_id"] == mine and e["type"] == EventType.ONLINE)
        wait_for(lambda: _status(theirs) == S.ONLINE, message="the other owner's workspace online")
        # Published after every event of the other owner's workspace so far: had any of those
        # reached this stream, it would have arrived before this one.
        assert mine_api.post(f"/api/workspaces/{mine}/stop/").status_code == 202
        stream.wait_for_event(lambda e: e["type"] == EventType.STOPPED)
    finally:
        stream.close()

    recorded = list(WorkspaceEvent.objects.filter(workspace_id=mine).order_by("id"))
    assert [event["id"] for event in stream.received] == [event.id for event in recorded]
    assert {event["workspace_id"] for event in stream.received} == {mine}
    assert [event["type"] for event in stream.received] == [
        EventType.PROVISIONING,
        EventType.ONLINE,
        EventType.STOPPED,
    ]
    assert WorkspaceEvent.objects.filter(workspace_id=theirs).exists()

    # Resume after the first event: the rest is replayed from the database, in order.
    first, last = recorded[0].id, recorded[-1].id
    resumed = StreamReader(live_server.url, _token(user), last_event_id=first)
    try:
        resumed.wait_for_event(lambda e: e["id"] == last)
    finally:
        resumed.close()
    assert [event["id"] for event in resumed.received] == [event.id for event in recorded[1:]]

    # Staff see everyone's events.
    staff = StreamReader(live_server.url, _token(make_user("root", staff=True)), last_event_id=0)
    try:
        staff.wait_for_event(lambda e: e["workspace_id"] == theirs)
        staff.wait_for_event(lambda e: e["id"] == last)
    finally:
        staff.close()
    assert {mine, theirs} <= {event["workspace_id"] for event in staff.received}


@pytest.mark.django_db
def test_stream_errors_are_json_and_name_the_field(user, api) -> None:
    anonymous = client_for(user)
    anonymous.credentials()
    response = anonymous.get("/api/events/stream", HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")

    bad_header = api.get(
        "/api/events/stream", HTTP_ACCEPT="text/event-stream", HTTP_LAST_EVENT_ID="abc"
    )
    assert bad_header.status_code == 400
    assert "Last-Event-ID" in bad_header.json()["detail"]
    bad_query = api.get("/api/events/stream", {"after": "-1"})
    assert bad_query.status_code == 400
    assert "after" in bad_query.json()["detail"]


@pytest.mark.django_db
def test_a_published_event_is_exactly_what_the_api_shows(user) -> None:
    """``event_data`` builds the event directly (it runs for every event published and replayed):
    the same fields and values as ``LiveEventSerializer``, for an event as inserted (enum members,
    a fresh time) and as read back."""
    from portal.api.serializers import LiveEventSerializer

    workspace = make_row(user, WorkspaceStatus.ONLINE)
    inserted = services.record_event(
        workspace.id,
        EventType.PROVISION_FAILED,
        EventSource.PREFLIGHT,
        3,
        {"missing_env": ["A", "B"], "template": "x", "n": 1.5},
    )
    for event in (inserted, WorkspaceEvent.objects.get(id=inserted.id)):
        built = event_channel.event_data(event)
        assert built == dict(LiveEventSerializer(event).data)
        assert json.dumps(built) == json.dumps(dict(LiveEventSerializer(event).data))


def _event(workspace: Workspace, event_id: int, type: EventType = EventType.ONLINE) -> Any:
    return WorkspaceEvent.objects.create(
        id=event_id,
        workspace=workspace,
        type=type,
        source=EventSource.AGENT,
        generation=workspace.generation,
        actor="agent",
    )


def _frames(frames: Any) -> list[dict[str, Any]]:
    """The events of SSE frames (comments and the retry line skipped)."""
    found = []
    for frame in frames:
        for line in frame.decode().splitlines():
            if line.startswith("data: "):
                found.append(json.loads(line.removeprefix("data: ")))
    return found


@pytest.mark.django_db
def test_a_workspace_page_resumes_after_its_own_events_not_the_newest_of_all(user, client) -> None:
    """Ids are handed out before commit, so an event of another workspace can be committed, and
    be the newest id, while an older id of this one is still on its way. The page's cursor is
    the last event of its own workspace, and its stream carries that workspace's events (and
    its members'), which are recorded in id order: the late event arrives; others' do not."""
    page_of = make_row(user, S.ONLINE, name="team")
    member = make_row(user, S.ONLINE, name="member")
    Workspace.objects.filter(id=member.id).update(parent_id=page_of.id)
    other = make_row(user, S.ONLINE, name="other")
    WorkspaceEvent.objects.filter(workspace__in=[page_of, member, other]).delete()
    _event(other, 10_000)  # committed first, with the newest id
    client.force_login(user)
    page = client.get(f"/w/{page_of.id}/").content.decode()
    assert 'data-after="0"' in page  # before: data-after="10000"
    late = _event(page_of, 9_000)  # the older id, committed after the page was rendered
    _event(member, 9_001)

    frames = live_events.stream(user, after=0, workspace=page_of.id, max_seconds=0.5)
    assert [event["id"] for event in _frames(frames)] == [late.id, 9_001]
    # Everyone's stream, after the newest id of all, never replays the late one: why the page
    # does not resume from there.
    frames = live_events.stream(user, after=10_000, max_seconds=0.5)
    assert _frames(frames) == []


@pytest.mark.django_db(transaction=True)  # the stream reads its scope on the reader's thread
def test_a_workspace_stream_carries_only_its_own_and_its_members_live_events(user) -> None:
    page_of = make_row(user, S.ONLINE, name="team")
    member = make_row(user, S.ONLINE, name="member")
    Workspace.objects.filter(id=member.id).update(parent_id=page_of.id)
    other = make_row(user, S.ONLINE, name="other")
    frames = live_events.stream(user, after=None, workspace=page_of.id, max_seconds=3)
    assert next(frames).startswith(b"retry:")  # subscribed
    received: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: received.extend(_frames(frames)))
    reader.start()
    time.sleep(0.3)
    for workspace, event_id in ((other, 20_001), (page_of, 20_002), (member, 20_003)):
        event_channel.publish(_event(workspace, event_id), user.pk)
    reader.join(timeout=10)
    assert [(e["id"], e["workspace_id"]) for e in received] == [
        (20_002, str(page_of.id)),
        (20_003, str(member.id)),
    ]


@pytest.mark.django_db
def test_the_workspace_filter_is_checked_and_named(api) -> None:
    response = api.get("/api/events/stream", {"workspace": "not-a-uuid"})
    assert response.status_code == 400
    assert "workspace" in response.json()["errors"]
