"""Every API error is JSON with a human-readable ``detail``; validation errors name the field."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    PermissionDenied,
    RequestDataTooBig,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import csrf, defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from workspaces import services

logger = logging.getLogger(__name__)


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    if isinstance(errors, dict):
        out: list[str] = []
        for key, value in errors.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_flatten(value, name))
        return out
    if isinstance(errors, list):
        out = []
        for item in errors:
            out.extend(_flatten(item, prefix))
        return out
    return [f"{prefix}: {errors}" if prefix and prefix != "non_field_errors" else str(errors)]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, services.InvalidInput):
        exc = exceptions.ValidationError({exc.field: [exc.message]})
    elif isinstance(exc, services.TransitionNotAllowed):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    elif isinstance(exc, services.LimitExceeded):
        return Response(
            {"detail": str(exc)},
            status=status.HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(exc.retry_after)},
        )
    elif isinstance(exc, services.AgentAuthError):
        return Response(
            {"detail": str(exc)},
            status=status.HTTP_401_UNAUTHORIZED,
            headers={"WWW-Authenticate": "Bearer"},
        )
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        errors = (
            response.data
            if isinstance(response.data, dict)
            else {"non_field_errors": response.data}
        )
        response.data = {"detail": "; ".join(_flatten(errors)), "errors": errors}
    return response


# Where Django itself answers in the API's JSON shape when it refuses a request before, or
# outside, a DRF view (handler400/403/404/500 and CSRF_FAILURE_VIEW): the API and the endpoints
# that probes and scrapers call. The HTML pages (the dashboard, /accounts/, /admin/) keep
# Django's own pages.
JSON_PATH_PREFIXES = ("/api/",)
JSON_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def answers_json(request: HttpRequest) -> bool:
    path = request.path_info
    return path.startswith(JSON_PATH_PREFIXES) or path in JSON_PATHS


def _json_error(status_code: int, message: str, field: str | None = None) -> JsonResponse:
    """The API's error shape; with ``field``, as a validation error naming it."""
    if field is None:
        return JsonResponse({"detail": message}, status=status_code)
    body = {"detail": f"{field}: {message}", "errors": {field: [message]}}
    return JsonResponse(body, status=status_code)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's 400s: a SuspiciousOperation or BadRequest raised by Django while it reads the
    request (a Host header outside ALLOWED_HOSTS or malformed, more query or form parameters
    than DATA_UPLOAD_MAX_NUMBER_FIELDS, ...). The message says which without echoing settings."""
    if not answers_json(request):
        return defaults.bad_request(request, exception or BadRequest())
    if isinstance(exception, DisallowedHost):
        return _json_error(400, "is not a host this server answers for", "Host")
    if isinstance(exception, TooManyFieldsSent | TooManyFilesSent):
        return _json_error(400, "has more parameters than this server accepts", "query")
    if isinstance(exception, RequestDataTooBig):
        return _json_error(400, "The request body is larger than this server accepts.")
    return _json_error(400, "Bad request.")


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not answers_json(request):
        return defaults.permission_denied(request, exception or PermissionDenied())
    return _json_error(403, "You do not have permission to perform this action.")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a write without its CSRF token to a view outside DRF (DRF's own
    views answer this 403 themselves, in JSON)."""
    if not answers_json(request):
        return csrf.csrf_failure(request, reason)
    return _json_error(403, f"CSRF verification failed: {reason}")


def json_404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not answers_json(request):
        return defaults.page_not_found(request, exception or Http404())
    return JsonResponse({"detail": "Not found."}, status=404)


def json_500(request: HttpRequest) -> HttpResponse:
    if not answers_json(request):
        return defaults.server_error(request)
    return JsonResponse({"detail": "Internal server error."}, status=500)
