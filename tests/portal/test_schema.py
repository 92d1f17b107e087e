"""The OpenAPI schema documents every error response and its shape, the name pattern, the
Bearer scheme of the agents' endpoints, and JSON as the only request body type."""

from __future__ import annotations

import re
from typing import Any

import pytest
from rest_framework.test import APIClient

from workspaces import services

pytestmark = pytest.mark.django_db

LIFECYCLE = ("start", "stop", "restart")


@pytest.fixture
def schema(api) -> dict[str, Any]:
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return dict(response.json())


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    ]


def test_every_operation_documents_its_errors_with_the_error_shape(schema) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        expected = {"400", "401", "413"}
        if "{id}" in path or (method == "GET" and path.endswith("/workspaces/")):
            expected.add("404")
        if "requestBody" in operation:
            expected.add("415")
        if method == "POST" and path.endswith(("/workspaces/", "/teams/")):
            expected.add("429")
        if method == "POST" and path.rstrip("/").rsplit("/", 1)[-1] in LIFECYCLE:
            expected.add("409")
        if path.endswith(("/start/", "/restart/")):
            expected.add("429")
        if path.endswith("/register"):
            expected.add("409")
        assert expected <= set(responses), (method, path, sorted(responses))
        for code in expected:
            assert responses[code]["content"]["application/json"]["schema"] == error, (path, code)
            assert responses[code]["description"]
        if "429" in responses:
            assert responses["429"]["headers"]["Retry-After"]["required"] is True
    error_schema = schema["components"]["schemas"]["Error"]
    assert error_schema["required"] == ["detail"]
    assert set(error_schema["properties"]) == {"detail", "errors"}


def test_registry_endpoints_carry_the_bearer_scheme(schema) -> None:
    scheme = schema["components"]["securitySchemes"]["workspaceToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for _, path, operation in _operations(schema):
        if path.startswith("/api/registry/"):
            assert operation["security"] == [{"workspaceToken": []}], path
        else:
            assert {"workspaceToken": []} not in operation["security"], path
            assert {"tokenAuth": []} in operation["security"], path


def test_the_name_pattern_is_in_the_schema_and_is_the_services_rule(schema) -> None:
    for component in ("WorkspaceCreateRequest", "TeamCreateRequest"):
        name = schema["components"]["schemas"][component]["properties"]["name"]
        assert name["pattern"] == services.NAME_RE.pattern
        assert (name["minLength"], name["maxLength"]) == (1, 63)
    pattern = re.compile(services.NAME_RE.pattern)
    assert pattern.fullmatch("dev-1") and not pattern.fullmatch("-dev")


def test_request_bodies_are_json_only(schema) -> None:
    for _, path, operation in _operations(schema):
        if "requestBody" in operation:
            assert set(operation["requestBody"]["content"]) == {"application/json"}, path


def test_the_schema_needs_no_credentials_to_be_an_error_in_json() -> None:
    response = APIClient().get("/api/workspaces/")
    assert response.status_code == 401
    assert set(response.json()) == {"detail"}
