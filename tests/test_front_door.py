"""The front door, against the server users run (``bin/run``'s stack, tests/stack.py): every page
answers, a stale cookie costs nothing, refused streams leave no database connection behind, and
a large or slow body is refused in bounded size and time on every path and both ports."""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection

from workspaces import services
from workspaces.models import Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PAGES = [
    "/accounts/login/",
    "/admin/login/",
    "/accounts/password_reset/",
    "/api-auth/login/",
    "/api/docs/",
    "/api/schema/",
    "/healthz",
]


def _token(user: Any) -> str:
    return services.issue_api_token(user)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_with_and_without_a_stale_session(on_stack, path) -> None:
    """A page that sets a cookie (the login form's CSRF token) and a request that carries a
    session the server no longer knows (its deletion is a Set-Cookie) both get an answer."""
    for headers in ({}, {"Cookie": "sessionid=stale"}):
        status, answered, body = on_stack.request("GET", path, headers=headers)
        assert status == 200, (path, headers, status, body[:300])
        assert body, (path, headers)
    if path in ("/accounts/login/", "/admin/login/"):
        _, answered, _ = on_stack.request("GET", path)
        assert "csrftoken=" in answered.get("set-cookie", ""), answered


def test_the_dashboard_sends_a_person_to_log_in(on_stack) -> None:
    status, answered, _ = on_stack.request("GET", "/")
    assert status == 302 and answered["location"].startswith("/accounts/login/"), answered


def test_the_pages_of_a_logged_in_person_answer(on_stack, user) -> None:
    """Logged in with a password through the login form (its CSRF cookie and token), a person's
    pages answer: the dashboard, a workspace's page, the password change form."""
    hasher = PBKDF2PasswordHasher()  # the stack verifies the production settings' hashers
    user.password = hasher.encode("x-password-123", hasher.salt())
    user.save(update_fields=["password"])
    token = _token(user)
    status, created = on_stack.api(
        "POST", "/api/workspaces/", token, {"name": "pages", "template": "shell-default"}
    )
    assert status == 201, created
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = browser.open(on_stack.url + "/accounts/login/", timeout=30).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert csrf, form[:500]
    fields = {"username": "alice", "password": "x-password-123", "csrfmiddlewaretoken": csrf[1]}
    answer = browser.open(
        on_stack.url + "/accounts/login/", urllib.parse.urlencode(fields).encode(), timeout=30
    )
    assert answer.status == 200 and answer.geturl().rstrip("/") == on_stack.url, answer.geturl()
    assert any(cookie.name == "sessionid" for cookie in jar)
    for path in ("/", f"/w/{created['id']}/", "/accounts/password_change/"):
        page = browser.open(on_stack.url + path, timeout=30)
        assert page.status == 200 and page.geturl().endswith(path), (path, page.geturl())
        assert page.read(), path


def test_a_stale_session_cookie_on_the_api(on_stack, user) -> None:
    """A list and a create sent with a session the server does not know: each is answered, and
    the create's 201 reaches the client with the workspace it wrote, once."""
    token = _token(user)
    stale = {"Cookie": "sessionid=stale"}
    status, page = on_stack.api("GET", "/api/workspaces/", token, **stale)
    assert status == 200 and page["count"] == 0, page
    status, created = on_stack.api(
        "POST", "/api/workspaces/", token, {"name": "stale", "template": "shell-default"}, **stale
    )
    assert status == 201, created
    assert created["name"] == "stale" and created["status"] == "provisioning"
    assert list(Workspace.objects.filter(owner=user).values_list("id", flat=True)) == [
        uuid.UUID(created["id"])
    ]


def _web_connections() -> int:
    """The web processes' connections to the test database (they name themselves "web")."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'web'"
        )
        return int(cursor.fetchone()[0])


def _concurrently(count: int, call: Any) -> list[Any]:
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        results[index] = call(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_refused_streams_leave_no_database_connection_open(on_stack, user) -> None:
    """200 stream requests refused 50 at a time (a bad token: 401; a bad parameter: 400): the
    web processes hold no more connections than their pools may (WEB_CONCURRENCY x
    DATABASE_POOL_MAX_SIZE, 2 x 10 here), however many were refused, and the pools still have
    connections to give: a refusal returns its connection like any request."""
    token = _token(user)
    stream = {"Accept": "text/event-stream"}

    def refused(index: int) -> int:
        if index % 2:
            headers = {**stream, "Authorization": f"Token bogus-{index}"}
            return on_stack.request("GET", "/api/events/stream", headers=headers)[0]
        headers = {**stream, "Authorization": f"Token {token}"}
        return on_stack.request("GET", "/api/events/stream?workspace=nope", headers=headers)[0]

    def ordinary(index: int) -> int:
        headers = {"Authorization": f"Token {token}"}
        return on_stack.request("GET", "/api/workspaces/", headers=headers)[0]

    for _ in range(4):
        statuses = _concurrently(50, refused)
        assert set(statuses) <= {400, 401}, statuses
        assert 0 < _web_connections() <= 2 * 10
    assert set(_concurrently(50, ordinary)) == {200}
    assert _web_connections() <= 2 * 10


def _raw(
    port: int, request: bytes, body_chunks: Any = (), timeout: float = 30.0
) -> tuple[int, bytes, float]:
    """Send ``request`` then ``body_chunks`` on a socket; the status, the answer and the seconds
    until it came. Sending stops when the server answers (it may close while we send)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.settimeout(0.001)
        answer = b""
        for chunk in body_chunks:
            with contextlib.suppress(BlockingIOError, TimeoutError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.settimeout(timeout)
                sock.sendall(chunk)
                sock.settimeout(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(timeout)
        while True:  # the refusals close the connection after their answer
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    elapsed = time.monotonic() - started
    assert answer, "an empty answer"
    return int(answer.split(b" ", 2)[1]), answer, elapsed


BODY_PATHS = ["/api/events/stream", "/api/workspaces/", "/healthz", "/accounts/login/"]


@pytest.mark.parametrize("path", BODY_PATHS)
def test_an_announced_gigabyte_is_refused_before_it_is_read(on_stack, path) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode()
    status, answer, elapsed = _raw(on_stack.web_port, head)
    assert status == 413, answer[:300]
    assert b"application/json" in answer.split(b"\r\n\r\n")[0].lower()
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("port_name", ["web_port", "registry_port"])
def test_a_chunked_gigabyte_is_refused_at_the_limit(on_stack, port_name) -> None:
    """A chunked body with no length: refused as soon as it passes the API's limit (2 MiB by
    default), long before a gigabyte has been sent."""
    path = "/api/events/stream" if port_name == "web_port" else "/api/registry/heartbeat"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    chunks = (chunk for _ in range(1_000_000_000 // len(piece)))
    status, answer, elapsed = _raw(getattr(on_stack, port_name), head, chunks)
    assert status == 413, answer[:300]
    assert elapsed < 20, elapsed


def test_a_body_that_stalls_is_answered_408(on_stack) -> None:
    """Headers and a byte of a 100-byte body, then nothing: a JSON 408 after
    REQUEST_BODY_SECONDS (10 s by default), whatever the path."""
    head = (
        b"POST /api/workspaces/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    status, answer, elapsed = _raw(on_stack.web_port, head)
    assert status == 408, answer[:300]
    assert "detail" in json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert elapsed < 15, elapsed
