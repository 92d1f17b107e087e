"""The OpenAPI schema documents every error an operation can answer, with one error shape:

* every operation: 400 (a bad ``Host``, or a NUL in a header or query parameter, is refused
  before any view; most operations also validate a body or parameters), 401 (no or a bad token),
  413 (a body above ``API_MAX_BODY_BYTES``, refused whatever the operation) and 503 (PostgreSQL
  or Redis lost mid-request: ``portal.api.middleware.ServiceUnavailableMiddleware``);
* every operation but the event streams: 406 (an Accept header that refuses JSON);
* operations that write (POST, PUT, PATCH, DELETE) with a session login among their schemes: 403
  (a session-authenticated write without its CSRF token);
* operations with a body, and those that refuse one (start, stop, restart, delete): 415 (JSON
  only);
* operations on ``/{id}/``: 404 (unknown, or another owner's workspace); paginated lists: 404
  (no such page);
* what a view declares in ``error_responses`` (by action or method): 409, 429, 503, ...

429 carries ``Retry-After``. Agents' operations carry the Bearer scheme (an extension below)."""

from __future__ import annotations

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.views import APIView

from portal.api.serializers import BodySerializer

DESCRIPTIONS = {
    400: "Bad request: a field, parameter or header is invalid; `errors` names it.",
    401: "No credentials, or credentials that are unknown or revoked.",
    403: "A request authenticated by a session login that writes without its CSRF token.",
    404: "No such workspace (or it belongs to someone else), or no such page.",
    406: "The Accept header refuses application/json, the only type the API answers.",
    409: "The request conflicts with the platform's state; `detail` says why: the workspace's "
    "current status forbids it, or the process backend's isolation forbids a new workspace "
    "(every uid of WORKSPACE_UID_RANGE in use; another owner's unisolated workspaces).",
    413: "The request body is larger than API_MAX_BODY_BYTES.",
    415: "The body is not JSON (application/json is the only accepted type).",
    429: "A limit refused the request (workspace quota, provisioning concurrency, open "
    "streams per user); nothing "
    "was written. Retry after `Retry-After` seconds.",
    503: "A service this operation needs cannot be reached (PostgreSQL or Redis, the "
    "workspace's backend, Redis for live events); `detail` names it. Nothing was written.",
}


class ErrorSerializer(serializers.Serializer):
    """Every error response: a human-readable `detail`; a validation error (400) also has
    `errors`, a list of messages per field, parameter or header name."""

    detail = serializers.CharField()
    # A field, not the Serializer.errors property: the serializer metaclass takes it off the class.
    errors = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()), required=False
    )

    class Meta:
        ref_name = "Error"


class AutoSchema(openapi.AutoSchema):
    def _error_codes(self) -> set[int]:
        codes = {400, 413, 503}
        if self.get_auth():
            codes.add(401)
        # DRF refuses an Accept header without application/json, unless the view forces its
        # negotiation (the event streams answer errors in JSON whatever was asked).
        negotiation = type(self.view).perform_content_negotiation
        if negotiation is APIView.perform_content_negotiation:
            codes.add(406)
        authenticators = self.view.get_authenticators()
        if self.method in ("POST", "PUT", "PATCH", "DELETE") and any(
            isinstance(auth, SessionAuthentication) for auth in authenticators
        ):
            codes.add(403)
        # A paginated list answers 404 to a page that does not exist (``?page=99``).
        if "{id}" in self.path or (self._is_list_view() and self._get_paginator()):
            codes.add(404)
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            codes.add(415)
        declared: dict[str, tuple[int, ...]] = getattr(self.view, "error_responses", {})
        key = getattr(self.view, "action", None) or self.method.lower()
        codes.update(declared.get(key, ()))
        return codes

    def _map_basic_serializer(self, serializer: Any, direction: Any) -> Any:
        schema = super()._map_basic_serializer(serializer, direction)
        if direction == "request" and isinstance(serializer, BodySerializer):
            schema["additionalProperties"] = False  # other keys are a 400 naming them
        return schema

    def _get_response_bodies(self, direction: Any = "response") -> Any:
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        for code in sorted(self._error_codes()):
            if str(code) in responses:
                continue
            response = self._get_response_for_code(
                ErrorSerializer, str(code), media_types=["application/json"], direction=direction
            )
            response["description"] = DESCRIPTIONS[code]
            if code == 429:
                response["headers"] = {
                    "Retry-After": {
                        "schema": {"type": "integer", "minimum": 0},
                        "required": True,
                        "description": "seconds to wait before asking again",
                    }
                }
            responses[str(code)] = response
        return responses


class AgentTokenScheme(OpenApiAuthenticationExtension):
    """``Authorization: Bearer <workspace token>`` on the agents' registry endpoints."""

    target_class = "portal.api.authentication.AgentTokenAuthentication"
    name = "workspaceToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        scheme: dict[str, Any] = build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Bearer"
        )
        scheme["description"] = "The workspace token the platform gives each cycle's agent."
        return scheme
