"""Every case of tests/hostile_cases.py through Django's test client against real PostgreSQL:
the status, a JSON error naming each field (HTML where the page is HTML), nothing written, and
the status documented in the OpenAPI schema for the operation. Plus the refusals a case list
cannot carry: the isolation's 409 (it needs a small WORKSPACE_UID_RANGE) and Django's handlers
for the errors no request can provoke on purpose (403 and 500 outside DRF)."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.test import Client
from drf_spectacular.generators import SchemaGenerator

from portal.api import errors
from tests.conftest import api_key_for
from tests.hostile_cases import (
    CASES,
    SEED_NAME,
    SEED_TEMPLATE,
    Case,
    answer_problems,
    request_parts,
    send_http,
)
from tests.support import lifecycle_queue
from workspaces import services
from workspaces.models import Workspace

pytestmark = pytest.mark.django_db


# Paths that answer but are not operations of the schema.
NOT_OPERATIONS = ("/api/schema/", "/api/docs/")


@functools.cache
def _schema() -> dict[str, Any]:
    return dict(SchemaGenerator().get_schema(request=None, public=True))


def documented(method: str, path: str) -> set[str] | None:
    """The statuses the schema documents for the operation serving ``path`` (None: the path is
    not an API operation, such as /healthz)."""
    bare = path.split("?", 1)[0]
    for template, operations in _schema()["paths"].items():
        pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, bare) and method.lower() in operations:
            return set(operations[method.lower()]["responses"])
    return None


def _snapshot() -> dict[str, Any]:
    """Every row the platform keeps, to tell that a refused request wrote nothing: the number of
    rows of each model of the workspaces app and of users, and each workspace row in full."""
    counts = {
        model.__name__: model._default_manager.count()
        for model in apps.get_app_config("workspaces").get_models()
    }
    counts["User"] = get_user_model().objects.count()
    rows = {
        str(row["id"]): {key: repr(value) for key, value in row.items()}
        for row in Workspace.objects.values()
    }
    return {"counts": counts, "workspaces": rows}


@pytest.fixture
def seed(user) -> Workspace:
    return services.create_workspace(owner=user, name=SEED_NAME, template=SEED_TEMPLATE)


def send(case: Case, *, seed_id: str, api_key: str) -> Any:
    """Through Django's test client, CSRF enforced as on a real server."""
    path, headers, data = request_parts(case, seed_id=seed_id, api_key=api_key)
    content_type = headers.pop("Content-Type", "application/octet-stream")
    client = Client(enforce_csrf_checks=True)
    return client.generic(case.method, path, data, content_type=content_type, headers=headers)


def assert_refused(case: Case, status: int, content_type: str, body: bytes) -> None:
    problems = answer_problems(case, status, content_type, body)
    assert not problems, (case.id, problems)


def assert_nothing_written(case: Case, before: dict[str, Any], owner: Any) -> None:
    assert _snapshot() == before, case.id
    for lookup in case.absent:
        assert not Workspace.objects.filter(owner=owner, **lookup).exists(), (case.id, lookup)


def test_the_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_hostile_request_is_refused_cleanly_and_writes_nothing(case, user, seed) -> None:
    workspace = seed
    api_key = api_key_for(user)
    before = _snapshot()
    response = send(case, seed_id=str(workspace.id), api_key=api_key)
    assert_refused(case, response.status_code, response["Content-Type"], response.content)
    assert_nothing_written(case, before, user)
    statuses = documented(case.method, case.path.replace("{seed}", str(workspace.id)))
    if case.path.startswith("/api/") and not case.path.startswith(NOT_OPERATIONS):
        assert statuses is not None, case.id
    if statuses is not None:
        assert str(case.status) in statuses, (case.id, sorted(statuses))


@pytest.mark.django_db(transaction=True)
def test_the_cases_over_http_against_the_stack(user, on_stack) -> None:
    """Every case over raw HTTP (a hostile Host sent as is) to the server bin/run starts: the
    same answers as through the test client, and nothing written."""
    # Its cycle goes to a queue no worker consumes: the seed must stay as it was written.
    with lifecycle_queue("hostile-seed-nobody"):
        workspace = services.create_workspace(owner=user, name=SEED_NAME, template=SEED_TEMPLATE)
    api_key = api_key_for(user)
    for case in CASES:
        before = _snapshot()
        status, content_type, body = send_http(
            case, on_stack.url, seed_id=str(workspace.id), api_key=api_key
        )
        assert_refused(case, status, content_type, body)
        assert_nothing_written(case, before, user)


def test_an_exhausted_uid_range_is_a_documented_409_that_writes_nothing(
    user, seed, settings
) -> None:
    """The process backend's isolation uids all in use: the create and the team create answer
    409 (IsolationRefused) in JSON, write nothing, and the schema says they can."""
    workspace = seed
    workspace.refresh_from_db()
    assert workspace.isolation_uid is not None
    settings.WORKSPACE_UID_RANGE = (workspace.isolation_uid, workspace.isolation_uid)
    client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Token {api_key_for(user)}")
    before = _snapshot()
    for path, template in (("/api/workspaces/", "shell-default"), ("/api/teams/", "team-default")):
        body = json.dumps({"name": "full", "template": template})
        response = client.post(path, body, content_type="application/json")
        assert response.status_code == 409, response.content
        assert response["Content-Type"] == "application/json"
        assert "WORKSPACE_UID_RANGE" in response.json()["detail"]
        assert "409" in (documented("POST", path) or set()), path
    assert _snapshot() == before


def test_a_session_write_without_its_csrf_token_is_a_documented_json_403(user, seed) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    before = _snapshot()
    body = json.dumps({"name": "csrf", "template": "shell-default"})
    response = client.post("/api/workspaces/", body, content_type="application/json")
    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert "CSRF" in response.json()["detail"]
    assert "403" in (documented("POST", "/api/workspaces/") or set())
    assert _snapshot() == before


def test_every_write_refuses_unknown_fields_the_same_way(api, seed) -> None:
    """One message per kind: a field of the workspace a request cannot set is read-only; any
    other is not a field of the request, which lists the ones it takes."""
    workspace = seed
    create = api.post(
        "/api/workspaces/", {"name": "x", "template": "shell-default", "owner": "a", "zz": 1}
    )
    patch = api.patch(f"/api/workspaces/{workspace.id}/", {"owner": "a", "zz": 1})
    start = api.post(f"/api/workspaces/{workspace.id}/start/", {"owner": "a", "zz": 1})
    for response, accepted in (
        (create, "name, template, env"),
        (patch, "name, env"),
        (start, "none"),
    ):
        assert response.status_code == 400
        assert response.json()["errors"] == {
            "owner": ["is read-only"],
            "zz": [f"is not a field of this request (accepted: {accepted})"],
        }


def test_the_schema_says_request_bodies_take_no_other_keys() -> None:
    components = _schema()["components"]["schemas"]
    for name in ("WorkspaceCreateRequest", "TeamCreateRequest", "PatchedWorkspaceUpdateRequest"):
        assert components[name]["additionalProperties"] is False, name


def test_requests_without_a_body_still_take_none_or_an_empty_object(api, seed) -> None:
    workspace = seed
    assert api.post(f"/api/workspaces/{workspace.id}/stop/").status_code == 202
    assert api.post(f"/api/workspaces/{workspace.id}/start/", {}, format="json").status_code == 202
    assert api.delete(f"/api/workspaces/{workspace.id}/", {}, format="json").status_code == 202


def test_django_handlers_answer_json_on_api_paths_and_html_elsewhere(rf) -> None:
    """handler403 and handler500 cannot be provoked by a request on purpose (DRF answers its
    own 403s; a 500 is a bug): their answers, called as Django calls them."""
    for path in ("/api/workspaces/", "/healthz"):
        denied = errors.permission_denied(rf.get(path), PermissionDenied())
        crashed = errors.json_500(rf.get(path))
        missing = errors.json_404(rf.get(path))
        for response, status in ((denied, 403), (crashed, 500), (missing, 404)):
            assert (response.status_code, response["Content-Type"]) == (status, "application/json")
            assert json.loads(response.content)["detail"]
    for path in ("/admin/", "/accounts/login/", "/"):
        for response in (
            errors.permission_denied(rf.get(path), PermissionDenied()),
            errors.json_500(rf.get(path)),
            errors.json_404(rf.get(path)),
            errors.bad_request(rf.get(path)),
        ):
            assert response["Content-Type"].startswith("text/html"), (path, response)


def test_the_url_conf_installs_the_handlers(settings) -> None:
    from project import urls

    assert urls.handler400 == "portal.api.errors.bad_request"
    assert urls.handler403 == "portal.api.errors.permission_denied"
    assert urls.handler404 == "portal.api.errors.json_404"
    assert urls.handler500 == "portal.api.errors.json_500"
    assert settings.CSRF_FAILURE_VIEW == "portal.api.errors.csrf_failure"
