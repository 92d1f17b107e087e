"""Workspace apps behind the proxy: their hosts and ports, the platform's public address, and
workspace cookies."""

from __future__ import annotations

from project.env import (
    env_choice,
    env_int,
    env_int_range,
    env_str,
    env_url,
    section,
)

section("proxy")
# Caddy serves every workspace's app at http://<name>--<owner>.<WORKSPACE_DOMAIN>:<port>/ (one
# browser origin per workspace); the platform writes its routes through Caddy's admin API.
PROXY_BIND = env_str("PROXY_BIND", "127.0.0.1:8080", doc="Where the proxy serves workspace apps.")
PROXY_ADMIN = env_str(
    "PROXY_ADMIN",
    "127.0.0.1:2019",
    doc="Caddy's admin API (keep it on a private address).",
)
# By default the web process's address (PLATFORM_PUBLIC_URL), never the registry-only listener
# that PLATFORM_URL names for agents.
PROXY_AUTH_UPSTREAM = env_str(
    "PROXY_AUTH_UPSTREAM",
    "",
    doc=(
        "Where the proxy asks the platform (`host:port`); empty: the host and port of "
        "`PLATFORM_PUBLIC_URL`."
    ),
)
# Browsers resolve *.localhost to the loopback address, so the default needs no DNS.
WORKSPACE_DOMAIN = env_str(
    "WORKSPACE_DOMAIN",
    "localhost",
    doc=(
        "Workspace hosts are `<name>--<owner>.<WORKSPACE_DOMAIN>` (browsers resolve "
        "`*.localhost` to the loopback address without DNS)."
    ),
)
WORKSPACE_URL_SCHEME = env_choice(
    "WORKSPACE_URL_SCHEME",
    "http",
    ("http", "https"),
    doc="`https` when TLS ends in front of the proxy (the cookie is then `Secure`).",
)
WORKSPACE_PUBLIC_PORT = env_int(
    "WORKSPACE_PUBLIC_PORT",
    0,
    minimum=0,
    doc="The port in `url`; `0`: the port of `PROXY_BIND` (80/443 are left out).",
)
PLATFORM_PUBLIC_URL = env_url(
    "PLATFORM_PUBLIC_URL",
    "http://127.0.0.1:8000",
    doc=(
        "Where browsers, API clients and the proxy's forward_auth reach the web process"
        " (never the registry-only listener agents call)."
    ),
)
WORKSPACE_APP_PORT_RANGE = env_int_range(
    "WORKSPACE_APP_PORTS",
    (20000, 29999),
    minimum=1024,
    maximum=65535,
    doc="Ports allocated to apps (`app: {port: auto}`).",
)
WORKSPACE_COOKIE_NAME = env_str(
    "WORKSPACE_COOKIE_NAME",
    "workspace_session",
    doc="The signed, host-only cookie that lets a browser into one workspace.",
)
WORKSPACE_COOKIE_MAX_AGE_SECONDS = env_int(
    "WORKSPACE_COOKIE_MAX_AGE_SECONDS",
    12 * 3600,
    minimum=60,
    doc="The workspace cookie's lifetime.",
)
WORKSPACE_TICKET_MAX_AGE_SECONDS = env_int(
    "WORKSPACE_TICKET_MAX_AGE_SECONDS",
    60,
    minimum=5,
    doc="A ticket's lifetime (each is accepted once).",
)
