"""The environment variable rules shared by the services (a user's env) and the template
manifests (an operator's env). A leaf module: the domain and the engine both import it.

The name rule ends in ``\\Z`` and is applied with ``fullmatch``: a ``$``-anchored pattern under
``re.match`` also accepts a final newline (``"PATH\\n"`` would pass the name rule and miss the
denylists)."""

from __future__ import annotations

import re

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Keys a template or a user may not set: the platform owns them.
RESERVED_ENV = frozenset(
    {
        "WORKSPACE_ID",
        "WORKSPACE_TOKEN",
        "PLATFORM_URL",
        "WORKSPACE_GENERATION",
        "WORKSPACE_APP_PORT",
        "WORKSPACE_APP_HEALTH_PATH",
        "WORKSPACE_APP_COMMAND",
        "WORKSPACE_APP_HOST",
        "WORKSPACE_SANDBOX",
    }
)


def is_env_name(key: object) -> bool:
    """Whether ``key`` is a string that is a whole variable name (no trailing newline)."""
    return isinstance(key, str) and ENV_NAME_RE.fullmatch(key) is not None
