"""Typed readers for environment variables.

Every reader fails loudly with ``ImproperlyConfigured`` naming the variable and the bad value, so a
typo in a deployment stops start-up instead of surfacing later as odd behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str, default: str | None, environ: Mapping[str, str] | None) -> str | None:
    env = os.environ if environ is None else environ
    value = env.get(name)
    return default if value is None else value.strip()


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    value = _raw(name, default, environ)
    assert value is not None
    return value


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    value = _raw(name, None, environ)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no)")


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    value = _raw(name, None, environ)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} must be at least {minimum}")
    return number


def env_optional_int(
    name: str, *, minimum: int | None = None, environ: Mapping[str, str] | None = None
) -> int | None:
    value = _raw(name, None, environ)
    if value is None or value == "":
        return None
    return env_int(name, 0, minimum=minimum, environ=environ)


def env_choice(
    name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> str:
    value = env_str(name, default, environ)
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value


def env_float(name: str, default: float, *, environ: Mapping[str, str] | None = None) -> float:
    value = _raw(name, None, environ)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if not number > 0:
        raise ImproperlyConfigured(f"{name}={value!r} must be positive")
    return number


def env_int_range(
    name: str,
    default: tuple[int, int],
    *,
    minimum: int = 0,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """Parse ``first-last`` (inclusive), e.g. ``200000-200999``."""
    value = _raw(name, None, environ)
    if value is None or value == "":
        return default
    first, sep, last = value.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not of the form first-last") from None
    if not sep or low > high or low < minimum:
        raise ImproperlyConfigured(
            f"{name}={value!r} must be first-last with first <= last and first >= {minimum}"
        )
    if maximum is not None and high > maximum:
        raise ImproperlyConfigured(f"{name}={value!r}: last must be at most {maximum}")
    return low, high


def env_list(name: str, default: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    value = _raw(name, None, environ)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_int_map(
    name: str, default: dict[str, int], environ: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Parse ``key=int,key=int`` (e.g. ``hermes=1800,claude-code=900``)."""
    value = _raw(name, None, environ)
    if value is None:
        return dict(default)
    result: dict[str, int] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, number = item.partition("=")
        if not sep or not key.strip():
            raise ImproperlyConfigured(f"{name}: {item!r} is not of the form key=seconds")
        try:
            seconds = int(number)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} has a non-integer value") from None
        if seconds <= 0:
            raise ImproperlyConfigured(f"{name}: {item!r} must be positive")
        result[key.strip()] = seconds
    return result


def env_database(name: str, default: str, environ: Mapping[str, str] | None = None) -> dict:
    """Parse a ``postgres://user:pass@host:port/name?opt=v`` URL into Django's DATABASES entry."""
    url = env_str(name, default, environ)
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(
            f"{name}={url!r}: only postgres:// URLs are supported (PostgreSQL is required)"
        )
    db_name = unquote(parsed.path.lstrip("/"))
    if not db_name:
        raise ImproperlyConfigured(f"{name}={url!r} has no database name")
    try:
        port = parsed.port
    except ValueError:
        raise ImproperlyConfigured(f"{name}={url!r} has a malformed port") from None
    options = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": db_name,
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(port or ""),
        "OPTIONS": options,
    }


def env_redis_url(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    url = env_str(name, default, environ)
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(f"{name}={url!r} is not a redis:// URL")
    try:
        parsed.port  # noqa: B018 - validates the port
    except ValueError:
        raise ImproperlyConfigured(f"{name}={url!r} has a malformed port") from None
    return url


def env_fernet_keys(
    name: str, default: list[str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """Comma-separated Fernet keys (32 url-safe base64-encoded bytes each), newest first."""
    from cryptography.fernet import Fernet

    keys = env_list(name, default, environ)
    if not keys:
        raise ImproperlyConfigured(f"{name} is empty: give at least one Fernet key")
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            # Never echo the value: it is a secret.
            raise ImproperlyConfigured(
                f"{name}: key {position} is not a Fernet key (32 url-safe base64-encoded bytes; "
                "make one with `python manage.py rotate_env_key --generate`)"
            ) from None
    return keys


def env_url(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    url = env_str(name, default, environ)
    parsed = urlparse(url)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise ImproperlyConfigured(f"{name}={url!r} is not an http(s) URL")
    return url.rstrip("/")
