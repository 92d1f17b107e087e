"""Two guards in front of every view.

* ``RequestGuardMiddleware`` (first in MIDDLEWARE) refuses hostile requests before any view,
  form or query sees them: a body announced larger than ``API_MAX_BODY_BYTES`` (413), and NUL in
  the path, a query parameter or a header (400 naming it). PostgreSQL cannot store NUL; without
  this a NUL in ``?q=`` of an admin search or in a ``Token`` header would reach a query and fail
  there as a 500.
* ``ServiceUnavailableMiddleware`` (last): a service the API depends on is unreachable, so the
  answer is 503 with Retry-After, never 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from portal.api.parsers import bad_text_reason

logger = logging.getLogger(__name__)

# A PostgreSQL connection lost mid-request (a restart, a failover, a terminated backend) or Redis
# unreachable where a request needs it. Writes are one transaction, so a request that fails here
# wrote nothing, unless the loss came after its commit; a committed intent is then carried out
# all the same (the row is the outbox) and a retry is answered from the row.
UNAVAILABLE = (OperationalError, InterfaceError, RedisConnectionError, RedisTimeoutError)


class ServiceUnavailableMiddleware:
    """Sync and async alike, as every middleware of the registry listener is: under ASGI, one
    sync-only middleware makes Django hop from the event loop to a thread and back around it
    (``async_to_sync`` inside ``sync_to_async``) on every request, the agents' heartbeats
    included. Its ``process_exception`` stays sync: Django runs it in a thread only when a view
    raised."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        response: HttpResponse = await self.get_response(request)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, UNAVAILABLE):
            return None
        logger.warning(
            "%s %s: service unavailable: %s: %s",
            request.method,
            request.path,
            exception.__class__.__name__,
            exception,
        )
        response = JsonResponse(
            {"detail": "A service the platform depends on is unavailable; retry shortly."},
            status=503,
        )
        response["Retry-After"] = str(settings.RETRY_AFTER_SECONDS)
        return response


class WebServiceUnavailableMiddleware(ServiceUnavailableMiddleware):
    """The web listener's, innermost: sync only, so that the middleware above it runs in sync
    mode. Django's own middleware (sessions, CSRF, auth, messages, ...) is built on
    ``MiddlewareMixin``, which in async mode runs each ``process_request`` and
    ``process_response`` through ``sync_to_async``: two hops to a thread and back per middleware
    per request. In sync mode the whole chain runs in one thread: one hop there, and one back to
    the event loop for Django's async handler, which serves the async views (the event and log
    streams) on the loop and the sync views in that same thread."""

    async_capable = False


def _bad_request(field: str, message: str) -> JsonResponse:
    return JsonResponse({"detail": f"{field}: {message}", "errors": {field: [message]}}, status=400)


def _header_name(meta_key: str) -> str:
    name = meta_key.removeprefix("HTTP_")
    return "-".join(part.capitalize() for part in name.split("_"))


class RequestGuardMiddleware:
    """Sync and async alike: the checks do no I/O, so under ASGI they run on the event loop
    without a hop to a thread."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        refusal = self.refusal(request)
        return refusal if refusal is not None else self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        refusal = self.refusal(request)
        return refusal if refusal is not None else await self.get_response(request)

    @staticmethod
    def refusal(request: HttpRequest) -> JsonResponse | None:
        limit: int = settings.API_MAX_BODY_BYTES
        announced = request.META.get("CONTENT_LENGTH") or "0"
        if not announced.isascii() or not announced.isdigit():
            return _bad_request("Content-Length", "must be a non-negative integer")
        # More digits than any real limit: refused without converting 4,301+ digits to an int.
        if len(announced) > 18 or int(announced) > limit:
            message = f"the request body is larger than {limit} bytes (API_MAX_BODY_BYTES)"
            return JsonResponse({"detail": message}, status=413)
        reason = bad_text_reason(request.path)
        if reason is not None:
            return _bad_request("path", reason)
        for key, value in request.META.items():
            is_header = key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")
            if is_header and isinstance(value, str) and "\x00" in value:
                return _bad_request(_header_name(key), "contains a NUL character (U+0000)")
        # QueryDict decodes with errors="replace", so only NUL (%00) can be left to refuse.
        for name, values in request.GET.lists():
            reason = bad_text_reason(name)
            if reason is not None:
                return _bad_request("query", f"a parameter name {reason}")
            for value in values:
                reason = bad_text_reason(value)
                if reason is not None:
                    return _bad_request(name, reason)
        return None
