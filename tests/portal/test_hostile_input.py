"""Hostile input never causes a 500: every case is a JSON 4xx naming the field, parameter or
header, and nothing is written. Bodies above API_MAX_BODY_BYTES are 413."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from tests.conftest import client_for
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent

pytestmark = pytest.mark.django_db


def _post_raw(api: APIClient, path: str, body: Any, **extra: Any) -> Any:
    return api.generic("POST", path, body, content_type="application/json", **extra)


def _assert_json_error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert field in body["errors"], body
        if field != "non_field_errors":
            assert field in body["detail"], body
    return dict(body)


def _nothing_written() -> None:
    assert not Workspace.objects.exists()
    assert not WorkspaceEvent.objects.exists()


# --- JSON structure ---------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [33, 1_000, 100_000])
def test_deeply_nested_json_is_a_400(api, depth) -> None:
    body = '{"name": "dev", "template": "shell-default", "env": ' + "[" * depth + "]" * depth + "}"
    response = _post_raw(api, "/api/workspaces/", body)
    assert response.status_code == 400, response.content
    assert "nested deeper than 32" in response.json()["detail"]
    _nothing_written()


def test_json_at_the_depth_limit_is_judged_by_the_serializer(api) -> None:
    # 32 levels parse; the serializer then names the field whose shape is wrong.
    body = '{"name": "dev", "template": "shell-default", "env": ' + "[" * 31 + "]" * 31 + "}"
    _assert_json_error(_post_raw(api, "/api/workspaces/", body), 400, "env")
    _nothing_written()


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"name": "dev", "template": NaN}',
        b'{"name": "dev", "template": Infinity}',
        b'{"name": "\xff\xfe"}',  # not UTF-8
        b'{"name": ' + b"9" * 5_000 + b"}",  # above Python's int digit limit
        b"",
    ],
)
def test_malformed_json_is_a_400(api, body) -> None:
    response = _post_raw(api, "/api/workspaces/", body)
    _assert_json_error(response, 400)
    _nothing_written()


# --- NUL and lone surrogates ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "dev\x00", "template": "shell-default"}, "name"),
        ({"name": "dev\ud800", "template": "shell-default"}, "name"),
        ({"name": "dev", "template": "shell-default\x00"}, "template"),
        ({"name": "dev", "template": "\udfff"}, "template"),
        ({"name": "dev", "template": "shell-default", "\x00": "x"}, "non_field_errors"),
        ({"name": "dev", "template": "shell-default", "extra": ["\ud83d"]}, "extra"),
    ],
)
def test_nul_and_lone_surrogates_in_a_body_are_a_400_naming_the_field(api, payload, field) -> None:
    # json.dumps escapes them ("\u0000", "\ud800"), as a hostile client would send them.
    response = _post_raw(api, "/api/workspaces/", json.dumps(payload))
    body = _assert_json_error(response, 400, field)
    assert "NUL" in body["detail"] or "surrogate" in body["detail"]
    _nothing_written()


def test_a_valid_surrogate_pair_is_ordinary_text(api) -> None:
    # "\ud83d\ude00" is one character (an emoji): refused by the name rule, not as bad text.
    response = _post_raw(api, "/api/workspaces/", '{"name": "\\ud83d\\ude00", "template": "x"}')
    body = _assert_json_error(response, 400, "name")
    assert "surrogate" not in body["detail"]


def test_lone_surrogates_in_an_agent_call_are_a_400(api) -> None:
    response = _post_raw(
        APIClient(),
        "/api/registry/register",
        '{"workspace_id": "\\ud800"}',
        HTTP_AUTHORIZATION="Bearer x",
    )
    # Authentication runs first: an unknown token is a 401, never a 500.
    assert response.status_code == 401
    response = _post_raw(api, "/api/workspaces/", '{"name": "dev", "template": "\\ud800"}')
    _assert_json_error(response, 400, "template")


def test_error_messages_that_echo_input_are_always_encodable(api, user) -> None:
    workspace = services.create_workspace(owner=user, name="dev", template="shell-default")
    response = api.get(f"/api/workspaces/{workspace.id}/events/", {"after": "é²"})
    _assert_json_error(response, 400, "after")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "online\x00"}, "status"),
        ({"page": "\x00"}, "page"),
        ({"\x00": "1"}, "query"),
    ],
)
def test_nul_in_a_query_parameter_is_a_400_naming_it(api, query, field) -> None:
    _assert_json_error(api.get("/api/workspaces/", query), 400, field)


def test_nul_in_the_admin_search_is_a_400_not_a_database_error(make_user) -> None:
    staff = make_user("root", staff=True)
    staff.is_superuser = True
    staff.save()
    client = APIClient()
    client.force_login(staff)
    assert client.get("/admin/workspaces/workspace/", {"q": "dev"}).status_code == 200
    _assert_json_error(client.get("/admin/workspaces/workspace/", {"q": "a\x00"}), 400, "q")


@pytest.mark.parametrize(
    ("header", "value", "name"),
    [
        ("HTTP_AUTHORIZATION", "Token abc\x00def", "Authorization"),
        ("HTTP_X_ANYTHING", "\x00", "X-Anything"),
    ],
)
def test_nul_in_a_header_is_a_400_naming_it(header, value, name) -> None:
    response = APIClient().get("/api/workspaces/", **{header: value})
    _assert_json_error(response, 400, name)


def test_nul_in_the_path_is_a_400() -> None:
    _assert_json_error(APIClient().get("/api/workspaces/\x00/"), 400, "path")


# --- Last-Event-ID and other ids ----------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    ["²", "٣", "12a", "-1", "1" * 4_301, str(2**63), "0" * 4_301 + "9" * 20],
)
def test_a_bad_last_event_id_is_a_400_naming_the_header(api, value) -> None:
    response = api.get(
        "/api/events/stream", HTTP_LAST_EVENT_ID=value, HTTP_ACCEPT="text/event-stream"
    )
    body = _assert_json_error(response, 400, "Last-Event-ID")
    assert "0 to 9223372036854775807" in body["detail"]


@pytest.mark.parametrize("value", [str(2**63), "1" * 4_301, "1e3", "²"])
def test_an_after_parameter_out_of_range_is_a_400(api, user, value) -> None:
    workspace = services.create_workspace(owner=user, name="dev", template="shell-default")
    _assert_json_error(
        api.get(f"/api/workspaces/{workspace.id}/events/", {"after": value}), 400, "after"
    )
    _assert_json_error(api.get("/api/events/stream", {"after": value}), 400, "after")


def test_a_largest_after_is_accepted(api, user) -> None:
    workspace = services.create_workspace(owner=user, name="dev", template="shell-default")
    response = api.get(f"/api/workspaces/{workspace.id}/events/", {"after": str(2**63 - 1)})
    assert response.status_code == 200
    assert response.json()["results"] == []


@pytest.mark.parametrize("page", ["9" * 5_000, "²", "-1", "0"])
def test_a_bad_page_number_is_a_404_not_a_500(api, page) -> None:
    response = api.get("/api/workspaces/", {"page": page, "page_size": "9" * 5_000})
    assert response.status_code == 404
    assert response.json()["detail"]


# --- body size ------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_in_json(api) -> None:
    ten_mb = json.dumps({"name": "dev", "template": "shell-default", "pad": "x" * 10_000_000})
    body = _assert_json_error(_post_raw(api, "/api/workspaces/", ten_mb), 413)
    assert "API_MAX_BODY_BYTES" in body["detail"]
    _nothing_written()


def test_a_body_over_a_lowered_limit_is_a_413_everywhere(api, settings) -> None:
    settings.API_MAX_BODY_BYTES = 100
    body = json.dumps({"name": "dev", "template": "shell-default", "pad": "x" * 100})
    _assert_json_error(_post_raw(api, "/api/workspaces/", body), 413)
    _assert_json_error(_post_raw(api, "/api/teams/", body), 413)
    _assert_json_error(_post_raw(APIClient(), "/api/registry/register", body), 413)
    _nothing_written()


def test_the_parser_bounds_a_body_the_middleware_did_not_see(settings) -> None:
    from io import BytesIO

    from portal.api.parsers import JSONParser, RequestTooLarge

    settings.API_MAX_BODY_BYTES = 10
    with pytest.raises(RequestTooLarge):
        JSONParser().parse(BytesIO(b'{"name": "0123456789"}'))
    assert JSONParser().parse(BytesIO(b'{"a": "b"}')) == {"a": "b"}


def test_a_bad_content_length_is_a_400(api) -> None:
    response = api.generic("POST", "/api/workspaces/", b"{}", CONTENT_LENGTH="1" * 4_301)
    _assert_json_error(response, 413)
    response = api.generic("POST", "/api/workspaces/", b"{}", CONTENT_LENGTH="²")
    _assert_json_error(response, 400, "Content-Length")


def _largest_env(escape_factor: int) -> dict[str, str]:
    """200 variables whose names and values total exactly MAX_ENV_TOTAL_BYTES, made of characters
    that JSON escapes at ``escape_factor`` bytes per byte (1: plain; 6: control characters)."""
    char = "a" if escape_factor == 1 else "\x01"
    names = [f"V{index:03d}" for index in range(services.MAX_ENV_VARS)]
    room = services.MAX_ENV_TOTAL_BYTES - sum(len(name) for name in names)
    sizes = [room // len(names)] * len(names)
    sizes[-1] += room - sum(sizes)
    assert max(sizes) <= services.MAX_ENV_VALUE_BYTES
    return {name: char * size for name, size in zip(names, sizes, strict=True)}


@pytest.mark.parametrize("escape_factor", [1, 6])
def test_the_largest_valid_env_fits_in_a_body(api, escape_factor) -> None:
    env = _largest_env(escape_factor)
    body = json.dumps({"name": "big", "template": "shell-default", "env": env})
    assert len(body) < settings.API_MAX_BODY_BYTES
    if escape_factor == 6:
        assert len(body) > 5.9 * services.MAX_ENV_TOTAL_BYTES
    response = _post_raw(api, "/api/workspaces/", body)
    assert response.status_code == 201, response.content[:300]
    assert Workspace.objects.get().env.reveal() == env


def test_an_env_over_the_total_limit_is_a_400_naming_env(api) -> None:
    env = _largest_env(1)
    env["V000"] += "a"
    payload = json.dumps({"name": "big", "template": "shell-default", "env": env})
    response = _post_raw(api, "/api/workspaces/", payload)
    body = _assert_json_error(response, 400, "env")
    assert str(services.MAX_ENV_TOTAL_BYTES) in body["detail"]
    response = _post_raw(
        api, "/api/teams/", json.dumps({"name": "big", "template": "team-default", "env": env})
    )
    _assert_json_error(response, 400, "env")
    _nothing_written()


# --- JSON only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["multipart", "form"])
def test_form_bodies_are_a_415(api, fmt) -> None:
    data = {"name": "dev", "template": "shell-default"}
    if fmt == "multipart":
        response = api.post("/api/workspaces/", data, format="multipart")
    else:
        response = api.generic(
            "POST",
            "/api/workspaces/",
            "name=dev&template=shell-default",
            content_type="application/x-www-form-urlencoded",
        )
    body = _assert_json_error(response, 415)
    assert "Unsupported media type" in body["detail"]
    _nothing_written()


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    # The name rule is a full match: "$" alone would let "dev\n" through to the database.
    with pytest.raises(services.InvalidInput) as refused:
        services.validate_name("dev\n")
    assert refused.value.field == "name"


def test_another_owner_cannot_probe_with_hostile_ids(api, other_user) -> None:
    workspace = services.create_workspace(owner=other_user, name="dev", template="shell-default")
    for path in (
        f"/api/workspaces/{workspace.id}/",
        "/api/workspaces/------------------------------------/",
        "/api/workspaces/zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz/",
    ):
        response = api.get(path)
        assert response.status_code == 404, path
    assert client_for(other_user).get(f"/api/workspaces/{workspace.id}/").status_code == 200


def test_the_guard_works_in_front_of_async_views_too(rf, settings) -> None:
    import asyncio

    from django.http import HttpResponse

    from portal.api.middleware import RequestGuardMiddleware

    async def view(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    guard = RequestGuardMiddleware(view)
    assert asyncio.iscoroutinefunction(guard)
    assert asyncio.run(guard(rf.get("/api/workspaces/"))).status_code == 200
    refused = asyncio.run(guard(rf.get("/api/workspaces/", {"status": "a\x00"})))
    assert refused.status_code == 400
    errors = json.loads(refused.content)["errors"]
    assert errors == {"status": ["contains a NUL character (U+0000)"]}
    settings.API_MAX_BODY_BYTES = 65_536
    big = rf.post("/api/workspaces/", "x" * 70_000, content_type="application/json")
    assert asyncio.run(guard(big)).status_code == 413
