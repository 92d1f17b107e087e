"""Typed readers for environment variables, and the configuration reference they declare.

Every reader fails loudly with ``ImproperlyConfigured`` naming the variable and the bad value, so a
typo in a deployment stops start-up instead of surfacing later as odd behaviour.

A reader given ``doc=`` also records the variable, its default, its type and that text in
``DECLARED``, under the section of the reference the last ``section(...)`` call named (or its own
``section=``); ``python -m project.env`` imports the settings and
prints the whole reference as markdown (docs/configuration.md is its output, and a test fails when
the two differ or a variable the settings read is missing from it). ``shown=`` replaces a default
that is computed (a path under the checkout, a value derived from another variable) by the words
the reference prints, so the reference is the same on every machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# The sections of the configuration reference, in the order it prints them, each with the
# sentence that opens it. ``section()`` and a reader's ``section=`` take one of these keys.
SECTIONS: dict[str, tuple[str, str]] = {
    "core": ("Core", "The services the platform needs, Django, and the processes that serve it."),
    "secrets": ("Secrets at rest", "Keys for what is stored encrypted (docs/operating.md)."),
    "limits": ("Limits", "What one request or one user may ask (docs/api.md)."),
    "celery": ("Celery", "Queues, time limits, retries and the sweeps' beat intervals."),
    "gate": ("The gate", "The per-workspace lock: one lifecycle cycle at a time per workspace."),
    "workspaces": ("Workspaces and the process backend", "Where workspaces run, from what."),
    "isolation": (
        "Isolation",
        "What a workspace may reach on the process backend (docs/operating.md).",
    ),
    "timeouts": ("Provisioning timeouts", "How long provisioning may take, and the sweeper."),
    "idle": ("Idle auto-stop", "Stopping workspaces nobody uses."),
    "pools": ("Warm pools", "Instances kept ready for a create to claim (docs/operating.md)."),
    "docker": ("Docker backend", "Containers on one engine (Swarm uses its image, user, limits)."),
    "swarm": ("Swarm backend", "Services on a swarm of engines."),
    "proxy": ("Workspace apps and the proxy", "How a workspace's app is reached."),
    "reconcile": ("Reconciliation, liveness and live events", "Keeping the database honest."),
    "logs": ("Workspace output", "The logs calls and their streams."),
    "readiness": ("Readiness", "What /readyz checks."),
    "restart": (
        "Restart policy",
        "A workspace whose instance dies while it is wanted running.",
    ),
}


@dataclass(frozen=True)
class Declared:
    """One environment variable as a reader declared it: what the reference prints."""

    name: str
    default: str
    kind: str
    doc: str
    section: str


# Filled as the settings run their readers: variable name -> declaration (the first one with a doc).
DECLARED: dict[str, Declared] = {}
# The section the declarations that follow belong to (``section()``).
_current_section = ""


def section(key: str) -> None:
    """Put the declarations that follow, up to the next call, in the reference's section ``key``
    (one of ``SECTIONS``): the settings call it before each group of readers."""
    if key not in SECTIONS:
        raise ImproperlyConfigured(f"section {key!r} is not one of project.env.SECTIONS")
    _set_section(key)


def _set_section(key: str) -> str:
    """Make ``key`` the current section, unchecked; returns the one it replaces."""
    global _current_section
    previous, _current_section = _current_section, key
    return previous


def _declare(name: str, default: str, kind: str, doc: str, section: str, shown: str | None) -> None:
    if not doc or name in DECLARED:
        return
    section = section or _current_section
    if not section:
        raise ImproperlyConfigured(f"{name}: no section: call project.env.section() before it")
    if section not in SECTIONS:
        raise ImproperlyConfigured(
            f"{name}: section={section!r} is not one of project.env.SECTIONS"
        )
    DECLARED[name] = Declared(name, default if shown is None else shown, kind, doc, section)


def _minimum(kind: str, minimum: int | None) -> str:
    return kind if minimum is None else f"{kind} ≥ {minimum}"


def _raw(name: str, default: str | None, environ: Mapping[str, str] | None) -> str | None:
    env = os.environ if environ is None else environ
    value = env.get(name)
    return default if value is None else value.strip()


def _str(name: str, default: str, environ: Mapping[str, str] | None) -> str:
    value = _raw(name, default, environ)
    assert value is not None
    return value


def env_str(
    name: str,
    default: str,
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> str:
    _declare(name, default, "string", doc, section, shown)
    return _str(name, default, environ)


def env_bool(
    name: str,
    default: bool,
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> bool:
    _declare(name, "true" if default else "false", "boolean", doc, section, shown)
    value = _raw(name, None, environ)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no)")


def _int(name: str, default: int, minimum: int | None, environ: Mapping[str, str] | None) -> int:
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


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    environ: Mapping[str, str] | None = None,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> int:
    _declare(name, str(default), _minimum("integer", minimum), doc, section, shown)
    return _int(name, default, minimum, environ)


def env_optional_int(
    name: str,
    *,
    minimum: int | None = None,
    environ: Mapping[str, str] | None = None,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> int | None:
    _declare(name, "unset", _minimum("integer", minimum), doc, section, shown)
    value = _raw(name, None, environ)
    if value is None or value == "":
        return None
    return _int(name, 0, minimum, environ)


def env_choice(
    name: str,
    default: str,
    choices: tuple[str, ...],
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> str:
    _declare(name, default, "one of " + ", ".join(choices), doc, section, shown)
    value = _str(name, default, environ)
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value


def env_float(
    name: str,
    default: float,
    *,
    environ: Mapping[str, str] | None = None,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> float:
    _declare(name, f"{default:g}", "number > 0", doc, section, shown)
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
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> tuple[int, int]:
    """Parse ``first-last`` (inclusive), e.g. ``200000-200999``."""
    bounds = f"first-last, first ≥ {minimum}" + ("" if maximum is None else f", last ≤ {maximum}")
    _declare(name, f"{default[0]}-{default[1]}", bounds, doc, section, shown)
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


def _list(name: str, default: list[str], environ: Mapping[str, str] | None) -> list[str]:
    value = _raw(name, None, environ)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_list(
    name: str,
    default: list[str],
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> list[str]:
    _declare(name, ",".join(default), "comma-separated list", doc, section, shown)
    return _list(name, default, environ)


def env_int_map(
    name: str,
    default: dict[str, int],
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
    minimum: int = 1,
    unit: str = "seconds",
) -> dict[str, int]:
    """Parse ``key=int,key=int`` (e.g. ``hermes=1800,claude-code=900``)."""
    text = ",".join(f"{key}={number}" for key, number in default.items())
    _declare(name, text, f"key={unit}, comma-separated", doc, section, shown)
    value = _raw(name, None, environ)
    if value is None:
        return dict(default)
    result: dict[str, int] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, number = item.partition("=")
        if not sep or not key.strip():
            raise ImproperlyConfigured(f"{name}: {item!r} is not of the form key={unit}")
        try:
            seconds = int(number)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} has a non-integer value") from None
        if seconds < minimum:
            raise ImproperlyConfigured(
                f"{name}: {item!r} must be positive"
                if minimum == 1
                else f"{name}: {item!r} must be at least {minimum}"
            )
        result[key.strip()] = seconds
    return result


def env_database(
    name: str,
    default: str,
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> dict:
    """Parse a ``postgres://user:pass@host:port/name?opt=v`` URL into Django's DATABASES entry."""
    _declare(name, default, "postgres:// URL", doc, section, shown)
    url = _str(name, default, environ)
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


def env_redis_url(
    name: str,
    default: str,
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> str:
    _declare(name, default, "redis://, rediss:// or unix:// URL", doc, section, shown)
    url = _str(name, default, environ)
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(f"{name}={url!r} is not a redis:// URL")
    try:
        parsed.port  # noqa: B018 - validates the port
    except ValueError:
        raise ImproperlyConfigured(f"{name}={url!r} has a malformed port") from None
    return url


def env_fernet_keys(
    name: str,
    default: list[str],
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> list[str]:
    """Comma-separated Fernet keys (32 url-safe base64-encoded bytes each), newest first."""
    from cryptography.fernet import Fernet

    _declare(name, ",".join(default), "comma-separated Fernet keys", doc, section, shown)
    keys = _list(name, default, environ)
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


def env_url(
    name: str,
    default: str,
    environ: Mapping[str, str] | None = None,
    *,
    doc: str = "",
    section: str = "",
    shown: str | None = None,
) -> str:
    _declare(name, default, "http(s) URL", doc, section, shown)
    url = _str(name, default, environ)
    parsed = urlparse(url)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise ImproperlyConfigured(f"{name}={url!r} is not an http(s) URL")
    return url.rstrip("/")


# --- The configuration reference ----------------------------------------------------------------

REFERENCE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "docs", "configuration.md"
)

_PREAMBLE = """\
# Configuration

Every setting is read from the environment by the parts of `project/settings/`, through the
typed readers of `project/env.py`. A malformed value stops start-up with a message naming the
variable (for example `GATE_LEASE_SECONDS='ten' is not an integer`); a secret is never echoed.
An empty value counts as unset for integers, numbers and ranges.

This file is generated from the settings' own declarations: do not edit it by hand. After
changing a declaration's `doc=` text (or adding a setting), run

```sh
.venv/bin/python -m project.env > docs/configuration.md
```

`tests/project/test_configuration_reference.py` fails when this file is not that output, or when
a variable the settings read is missing from it.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return "empty" if text == "" else f"`{text}`"


def render_reference(declared: Mapping[str, Declared] | None = None) -> str:
    """The configuration reference as markdown: one table per section, in ``SECTIONS`` order."""
    entries = DECLARED if declared is None else declared
    lines = [_PREAMBLE]
    for key, (title, intro) in SECTIONS.items():
        rows = [entry for entry in entries.values() if entry.section == key]
        if not rows:
            continue
        lines.append(f"## {title}\n")
        lines.append(f"{intro}\n")
        lines.append("| variable | default | type | meaning |")
        lines.append("|---|---|---|---|")
        for entry in rows:
            # A shown default in parentheses is words, not a value.
            default = entry.default if entry.default.startswith("(") else _code(entry.default)
            lines.append(
                f"| `{entry.name}` | {_cell(default)} | {_cell(entry.kind)} | {_cell(entry.doc)} |"
            )
        lines.append("")
    return "\n".join(lines)


def load_declarations(package_name: str = "project.settings") -> Mapping[str, Declared]:
    """Every declaration of the settings: those their import runs, and those in a branch the
    import did not take (a reader inside an ``if``), evaluated from each part's source in that
    part's own namespace, so the reference does not depend on the environment it is generated in."""
    import importlib

    # Run as ``python -m project.env`` this file is ``__main__``: the settings fill the registry of
    # the imported ``project.env`` module, which is the one to read.
    registry = importlib.import_module("project.env")
    package = importlib.import_module(package_name)
    previous = registry._set_section("")
    try:
        for part in package.PARTS:
            _declare_untaken_branches(registry, importlib.import_module(f"{package_name}.{part}"))
    finally:
        registry._set_section(previous)
    declared: Mapping[str, Declared] = registry.DECLARED
    return declared


def _declare_untaken_branches(registry: ModuleType, module: ModuleType) -> None:
    """Evaluate each reader call of ``module``'s source that its import did not run, under the
    section of the last ``section()`` call above it."""
    import ast

    path = module.__file__
    assert path is not None
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    readers = {name for name in vars(registry) if name.startswith("env_")}
    # The module's section() calls by line: a reader evaluated here is in the last one above it.
    markers = sorted(
        (node.lineno, node.value.args[0].value)
        for node in tree.body
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "section"
        and node.value.args
        and isinstance(node.value.args[0], ast.Constant)
    )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in readers
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value not in registry.DECLARED
        ):
            above = [key for line, key in markers if line < node.lineno]
            registry._set_section(above[-1] if above else "")
            eval(compile(ast.Expression(node), path, "eval"), vars(module))


def main(argv: list[str]) -> int:
    text = render_reference(load_declarations())
    if argv[1:] == ["--check"]:
        with open(REFERENCE_PATH, encoding="utf-8") as current:
            if current.read() != text:
                print(
                    "docs/configuration.md is not up to date: run python -m project.env",
                    file=sys.stderr,
                )
                return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
