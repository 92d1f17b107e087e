"""Hostile requests and what the platform must answer to each, as plain data (str, bytes, dicts),
so the same list runs through Django's test client (tests/portal/test_hostile_cases.py) and
over HTTP against the Procfile's real stack.

How a runner uses a case:

* Before the cases: a user with an API token, and one workspace of theirs, ``SEED_NAME`` from
  ``SEED_TEMPLATE``. ``{seed}`` in a path is that workspace's id.
* The request: ``method`` and ``path`` (query string included), ``body`` as the exact bytes to
  send (None: no body), ``headers`` as given (``Content-Type: application/json`` is added when
  there is a body and the case names none) plus, by ``auth``: ``Authorization: Token <key>``
  ("token") or nothing ("none").
  ``{seed}`` in a body is replaced too. ``Host`` in ``headers`` replaces the host the client
  would send. CSRF is enforced, as on a real server.
* The answer: ``status``; the Content-Type is ``application/json`` (``text/html`` where
  ``json`` is False: the HTML pages keep their HTML); a JSON answer has a non-empty string
  ``detail``, and each name of ``fields`` is a key of ``errors`` and appears in ``detail``.
* Nothing written: no workspace of the caller matches a filter of ``absent`` (each a dict of
  ``GET /api/workspaces/`` filters, so an HTTP runner can ask the API), the caller has no
  workspace but the seed, and the seed's ``name``, ``template``, ``desired_state`` and
  ``pending_changes`` are what they were (``SEED_FIELDS``).
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

SEED_NAME = "hostile-seed"
SEED_TEMPLATE = "shell-default"
# What a refused request must leave as it was on the seed workspace (fields of its JSON).
SEED_FIELDS = ("name", "template", "desired_state", "pending_changes")
# Django refuses more query parameters than DATA_UPLOAD_MAX_NUMBER_FIELDS (1,000 by default).
MANY_PARAMETERS = 1_001


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int
    fields: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    absent: tuple[dict[str, str], ...] = ()
    auth: str = "token"  # "token" | "none"
    json: bool = True


def body(**values: Any) -> bytes:
    return json.dumps(values).encode()


def create(**values: Any) -> bytes:
    """A create body: a valid one, with ``values`` added or replacing its fields."""
    return body(**{"name": "hostile-new", "template": SEED_TEMPLATE, **values})


def team(**values: Any) -> bytes:
    return body(**{"name": "hostile-team", "template": "team-default", **values})


NEW = {"name": "hostile-new"}
TEAM = {"name": "hostile-team"}
W = "/api/workspaces/"
SEED = "/api/workspaces/{seed}/"

CASES: tuple[Case, ...] = (
    # --- env names: a final newline is not a name, and never slips past the denylists
    Case(
        "env-PATH-newline", "POST", W, create(env={"PATH\n": "/tmp"}), 400, ("env",), absent=(NEW,)
    ),
    Case("env-LD_PRELOAD-newline", "POST", W, create(env={"LD_PRELOAD\n": "/x.so"}), 400, ("env",)),
    Case("env-reserved-newline", "POST", W, create(env={"WORKSPACE_ID\n": "x"}), 400, ("env",)),
    Case("env-plain-newline", "POST", W, create(env={"FOO\n": "x"}), 400, ("env",), absent=(NEW,)),
    Case("patch-env-PATH-newline", "PATCH", SEED, body(env={"PATH\n": "/tmp"}), 400, ("env",)),
    Case(
        "team-env-PATH-newline",
        "POST",
        "/api/teams/",
        team(env={"PATH\n": "/tmp"}),
        400,
        ("env",),
        absent=(TEAM,),
    ),
    # --- a name or template is a JSON string, taken exactly as sent
    Case(
        "name-1e999",
        "POST",
        W,
        b'{"name": 1e999, "template": "shell-default"}',
        400,
        ("name",),
        absent=({"name": "inf"},),
    ),
    Case("name-number", "POST", W, create(name=12), 400, ("name",), absent=({"name": "12"},)),
    Case("name-true", "POST", W, create(name=True), 400, ("name",), absent=({"name": "True"},)),
    Case("name-list", "POST", W, create(name=["abc"]), 400, ("name",)),
    Case("name-object", "POST", W, create(name={"a": "b"}), 400, ("name",)),
    Case("name-null", "POST", W, create(name=None), 400, ("name",)),
    Case(
        "name-newline", "POST", W, create(name="abc\n"), 400, ("name",), absent=({"name": "abc"},)
    ),
    Case("name-space", "POST", W, create(name=" abc"), 400, ("name",), absent=({"name": "abc"},)),
    Case("name-tab", "POST", W, create(name="abc\t"), 400, ("name",), absent=({"name": "abc"},)),
    Case(
        "template-space",
        "POST",
        W,
        create(template=" shell-default"),
        400,
        ("template",),
        absent=(NEW,),
    ),
    Case(
        "template-newline",
        "POST",
        W,
        create(template="shell-default\n"),
        400,
        ("template",),
        absent=(NEW,),
    ),
    Case("template-number", "POST", W, create(template=1), 400, ("template",), absent=(NEW,)),
    Case("template-null", "POST", W, create(template=None), 400, ("template",), absent=(NEW,)),
    Case(
        "patch-name-1e999",
        "PATCH",
        SEED,
        b'{"name": 1e999}',
        400,
        ("name",),
        absent=({"name": "inf"},),
    ),
    Case(
        "patch-name-newline",
        "PATCH",
        SEED,
        body(name="abc\n"),
        400,
        ("name",),
        absent=({"name": "abc"},),
    ),
    Case("patch-name-number", "PATCH", SEED, body(name=7), 400, ("name",), absent=({"name": "7"},)),
    Case(
        "team-name-1e999",
        "POST",
        "/api/teams/",
        b'{"name": 1e999, "template": "team-default"}',
        400,
        ("name",),
        absent=({"name": "inf"},),
    ),
    Case(
        "team-name-newline",
        "POST",
        "/api/teams/",
        team(name="abc\n"),
        400,
        ("name",),
        absent=({"name": "abc"},),
    ),
    Case(
        "team-template-space",
        "POST",
        "/api/teams/",
        team(template=" team-default"),
        400,
        ("template",),
        absent=(TEAM,),
    ),
    # --- unknown and read-only fields are refused, by every write, each one named
    Case("create-owner", "POST", W, create(owner="mallory"), 400, ("owner",), absent=(NEW,)),
    Case("create-status", "POST", W, create(status="online"), 400, ("status",), absent=(NEW,)),
    Case(
        "create-id",
        "POST",
        W,
        create(id="00000000-0000-0000-0000-000000000001"),
        400,
        ("id",),
        absent=(NEW,),
    ),
    Case("create-unknown", "POST", W, create(colour="red"), 400, ("colour",), absent=(NEW,)),
    Case(
        "create-unknown-and-bad-name",
        "POST",
        W,
        create(name="abc\n", backend="docker", x=1),
        400,
        ("name", "backend", "x"),
        absent=({"name": "abc"},),
    ),
    Case(
        "team-owner", "POST", "/api/teams/", team(owner="mallory"), 400, ("owner",), absent=(TEAM,)
    ),
    Case(
        "team-unknown",
        "POST",
        "/api/teams/",
        team(members=["shell-default"]),
        400,
        ("members",),
        absent=(TEAM,),
    ),
    Case("patch-status", "PATCH", SEED, body(status="online"), 400, ("status",)),
    Case("patch-template", "PATCH", SEED, body(template="hermes-default"), 400, ("template",)),
    Case(
        "patch-unknown-and-name",
        "PATCH",
        SEED,
        body(name="renamed", colour="red"),
        400,
        ("colour",),
        absent=({"name": "renamed"},),
    ),
    Case("start-body", "POST", SEED + "start/", body(force=True), 400, ("force",)),
    Case("stop-body", "POST", SEED + "stop/", body(status="stopped"), 400, ("status",)),
    Case("restart-body", "POST", SEED + "restart/", body(generation=9), 400, ("generation",)),
    Case("stop-list-body", "POST", SEED + "stop/", b"[1]", 400, ("non_field_errors",)),
    Case("delete-body", "DELETE", SEED, body(cascade=False), 400, ("cascade",)),
    # A body they do not take is parsed to be refused: JSON only, as everywhere.
    Case(
        "start-form-body",
        "POST",
        SEED + "start/",
        b"force=1",
        415,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case("delete-text-body", "DELETE", SEED, b"x", 415, headers={"Content-Type": "text/plain"}),
    # --- Django's own refusals answer in the API's JSON on the API's paths
    Case("host-evil-list", "GET", W, None, 400, ("Host",), headers={"Host": "evil.example"}),
    Case(
        "host-evil-create",
        "POST",
        W,
        create(),
        400,
        ("Host",),
        headers={"Host": "evil.example"},
        absent=(NEW,),
    ),
    Case("host-malformed", "GET", W, None, 400, ("Host",), headers={"Host": "bad host"}),
    Case("host-bad-port", "GET", W, None, 400, ("Host",), headers={"Host": "localhost:port"}),
    Case(
        "host-healthz",
        "GET",
        "/healthz",
        None,
        400,
        ("Host",),
        headers={"Host": "evil.example"},
        auth="none",
    ),
    Case(
        "host-readyz",
        "GET",
        "/readyz",
        None,
        400,
        ("Host",),
        headers={"Host": "evil.example"},
        auth="none",
    ),
    Case(
        "host-schema", "GET", "/api/schema/", None, 400, ("Host",), headers={"Host": "evil.example"}
    ),
    Case(
        "too-many-parameters",
        "GET",
        W + "?" + "&".join(["a=1"] * MANY_PARAMETERS),
        None,
        400,
        ("query",),
    ),
    Case("csrf-healthz", "POST", "/healthz", b"{}", 403, auth="none"),
    # The API answers JSON only, and says so in JSON.
    Case("accept-html", "GET", W, None, 406, headers={"Accept": "text/html"}),
    Case(
        "accept-xml-create",
        "POST",
        W,
        create(),
        406,
        headers={"Accept": "application/xml"},
        absent=(NEW,),
    ),
    # The HTML pages keep Django's HTML answers.
    Case(
        "host-evil-login-page",
        "GET",
        "/accounts/login/",
        None,
        400,
        headers={"Host": "evil.example"},
        auth="none",
        json=False,
    ),
    Case(
        "csrf-login-page",
        "POST",
        "/accounts/login/",
        b"username=a&password=b",
        403,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth="none",
        json=False,
    ),
)


def request_parts(case: Case, *, seed_id: str, api_key: str) -> tuple[str, dict[str, str], bytes]:
    """The path, headers and body to send for ``case`` (``Host`` among the headers only when the
    case sets one; without it, the client's own)."""
    headers = dict(case.headers)
    if case.body is not None:
        headers.setdefault("Content-Type", "application/json")
    if case.auth == "token":
        headers["Authorization"] = f"Token {api_key}"
    body = b"" if case.body is None else case.body.replace(b"{seed}", seed_id.encode())
    return case.path.replace("{seed}", seed_id), headers, body


def send_http(case: Case, base_url: str, *, seed_id: str, api_key: str) -> tuple[int, str, bytes]:
    """Send ``case`` over HTTP to the server at ``base_url`` (``http://host:port``) and return
    the status, the Content-Type and the body. http.client, so a hostile ``Host`` is sent as is."""
    url = urlsplit(base_url)
    path, headers, body = request_parts(case, seed_id=seed_id, api_key=api_key)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        connection.putrequest(
            case.method, path, skip_host="Host" in headers, skip_accept_encoding=True
        )
        for name, value in headers.items():
            connection.putheader(name, value)
        if case.body is not None or case.method in ("POST", "PUT", "PATCH"):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def answer_problems(case: Case, status: int, content_type: str, body: bytes) -> list[str]:
    """What is wrong with an answer to ``case`` (empty: it is the refusal the case expects)."""
    problems = []
    if status != case.status:
        problems.append(f"status {status}, expected {case.status}: {body[:300]!r}")
    wanted = "application/json" if case.json else "text/html"
    if not content_type.startswith(wanted):
        return [*problems, f"Content-Type {content_type!r}, expected {wanted}: {body[:300]!r}"]
    if not case.json:
        return problems
    try:
        answer = json.loads(body)
    except ValueError:
        return [*problems, f"not JSON: {body[:300]!r}"]
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if not isinstance(detail, str) or not detail:
        return [*problems, f"no detail: {answer!r}"]
    for name in case.fields:
        if name not in (answer.get("errors") or {}):
            problems.append(f"errors does not name {name}: {answer!r}")
        elif name != "non_field_errors" and name not in detail:
            problems.append(f"detail does not name {name}: {answer!r}")
    return problems
