"""The API reads JSON only, and reads it defensively: a body larger than ``API_MAX_BODY_BYTES``
is a 413, a body nested deeper than ``MAX_JSON_DEPTH`` or holding text PostgreSQL cannot store
(NUL, lone surrogates) is a 400 naming the field. Nothing of the body reaches a service or the
database before these checks pass."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers, status

# Our bodies are two levels deep (``{"env": {"KEY": "value"}}``); anything much deeper is hostile.
MAX_JSON_DEPTH = 32
# PostgreSQL text cannot hold NUL, and UTF-8 cannot encode a lone surrogate (JSON can: "\ud800").
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "request body too large"
    default_code = "request_too_large"


def body_too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body is larger than {limit} bytes (API_MAX_BODY_BYTES)")


def bad_text_reason(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None when it can."""
    match = _BAD_TEXT.search(text)
    if match is None:
        return None
    if match.group() == "\x00":
        return "contains a NUL character (U+0000)"
    return f"contains a lone surrogate (U+{ord(match.group()):04X}), which is not valid text"


def _reject(field: str, message: str) -> exceptions.ValidationError:
    return exceptions.ValidationError({field: [message]})


def check_json_value(data: Any) -> None:
    """Walk the parsed body without recursion (a deep body must not exhaust the stack here
    either): reject nesting deeper than MAX_JSON_DEPTH and NUL or lone surrogates in any key or
    string. The error is keyed by the top-level field and its message names the full path."""
    stack: list[tuple[Any, str, str, int]] = [(data, "", "non_field_errors", 0)]
    while stack:
        value, path, field, depth = stack.pop()
        if isinstance(value, str):
            reason = bad_text_reason(value)
            if reason is not None:
                raise _reject(field, f"{path or 'the body'} {reason}")
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise _reject(field, f"{path or 'the body'} is nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(value, list):
            for index, item in enumerate(value):
                stack.append((item, f"{path}[{index}]", field, depth + 1))
            continue
        for key, item in value.items():
            reason = bad_text_reason(key)
            if reason is not None:
                where = f"a key of {path}" if path else "a key"
                raise _reject(field if path else "non_field_errors", f"{where} {reason}")
            stack.append(
                (item, f"{path}.{key}" if path else key, field if path else key, depth + 1)
            )


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with a size limit, a depth limit and a text check."""

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        limit: int = settings.API_MAX_BODY_BYTES
        # The middleware already refused a Content-Length above the limit; this also bounds a
        # body whose length was not announced.
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise body_too_large(limit)
        try:
            # JSON is UTF-8 (RFC 8259); a body that is not is a 400, not a guess.
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        except RecursionError:
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than {MAX_JSON_DEPTH}"
            ) from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        check_json_value(data)
        return data
