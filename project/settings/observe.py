"""Keeping the database honest and showing it: reconciliation, liveness, live events, workspace
output, readiness."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from project.env import (
    env_bool,
    env_float,
    env_int,
    env_str,
    section,
)
from project.settings.web import REDIS_URL

section("reconcile")
# One reconciliation pass compares every non-removed workspace with its backend (one
# list_instances() call per backend) and repairs drift; see provisioning/reconciler.py.
RECONCILE_INTERVAL_SECONDS = env_int(
    "RECONCILE_INTERVAL_SECONDS",
    60,
    minimum=1,
    doc="How often beat runs a reconciliation pass.",
)
LIVENESS_WINDOW_SECONDS = env_int(
    "LIVENESS_WINDOW_SECONDS",
    30,
    minimum=1,
    doc="Heartbeats older than this make an online or degraded workspace offline.",
)
# The heartbeat interval the platform gives every agent (a template's env may set its own): a
# third of the window by default, so a workspace goes offline only after three missed beats and
# the heartbeat load is no higher than the window needs (10 s: 100 requests/s per 1,000 online
# workspaces).
AGENT_HEARTBEAT_SECONDS = env_float(
    "AGENT_HEARTBEAT_SECONDS",
    round(LIVENESS_WINDOW_SECONDS / 3, 1),
    doc=(
        "The heartbeat interval the platform passes to every agent (a template's `env` "
        "overrides it)."
    ),
    shown="(a third of `LIVENESS_WINDOW_SECONDS`: 10)",
)
LIVENESS_SWEEP_INTERVAL_SECONDS = env_int(
    "LIVENESS_SWEEP_INTERVAL_SECONDS",
    10,
    minimum=1,
    doc="How often beat runs the liveness sweep.",
)
EVENTS_STREAM_MAX_SECONDS = env_int(
    "EVENTS_STREAM_MAX_SECONDS",
    300,
    minimum=1,
    doc=(
        "Longest a single event stream response lasts (the client reconnects with `Last-Event-ID`)."
    ),
)
EVENTS_STREAM_KEEPALIVE_SECONDS = env_int(
    "EVENTS_STREAM_KEEPALIVE_SECONDS",
    15,
    minimum=1,
    doc="Idle time before a keepalive comment on an event stream.",
)
EVENTS_STREAMS_PER_USER = env_int(
    "EVENTS_STREAMS_PER_USER",
    10,
    minimum=1,
    doc=(
        "Open event streams a user may hold at once (across all web processes); one more is a 429."
    ),
)
EVENTS_STREAM_LEASE_SECONDS = env_int(
    "EVENTS_STREAM_LEASE_SECONDS",
    30,
    minimum=3,
    doc=("A stream renews its place every third of this; a dead process's places free after it."),
)
EVENTS_STREAM_RETRY_MS = env_int(
    "EVENTS_STREAM_RETRY_MS",
    2000,
    minimum=0,
    doc="Reconnect delay told to `EventSource` clients.",
)
# Redis pub/sub channels are shared by every database of a Redis server, so the default prefix
# names the database, like the keys it sits beside.
_redis_url = urlparse(REDIS_URL)
_redis_db = parse_qs(_redis_url.query).get("db", [""])[0] or (
    _redis_url.path.strip("/") if _redis_url.scheme != "unix" else ""
)
EVENTS_CHANNEL_PREFIX = env_str(
    "EVENTS_CHANNEL_PREFIX",
    f"wsevents:{_redis_db or '0'}",
    doc=("Redis pub/sub channel prefix (channels are shared by all databases of a Redis server)."),
    shown="wsevents:<redis db>",
)

section("logs")
LOGS_DEFAULT_TAIL = env_int(
    "LOGS_DEFAULT_TAIL",
    100,
    minimum=1,
    doc="Lines a logs call returns when it gives no `tail`.",
)
LOGS_MAX_TAIL = env_int(
    "LOGS_MAX_TAIL",
    2000,
    minimum=1,
    doc="The largest `tail`; more is a 400 naming `tail`.",
)
LOGS_MAX_BYTES = env_int(
    "LOGS_MAX_BYTES",
    256 * 1024,
    minimum=1024,
    doc="At most this much of an instance's output is read, whatever `tail` says.",
)
LOGS_STREAM_MAX_SECONDS = env_int(
    "LOGS_STREAM_MAX_SECONDS",
    300,
    minimum=1,
    doc="Longest a log stream lasts (then `event: end`).",
)
LOGS_STREAMS_PER_USER = env_int(
    "LOGS_STREAMS_PER_USER",
    5,
    minimum=1,
    doc=(
        "Open log streams a user may hold (their own places, beside the event "
        "streams'); one more is a 429 with `Retry-After`."
    ),
)
LOGS_STREAM_MAX_LINE_BYTES = env_int(
    "LOGS_STREAM_MAX_LINE_BYTES",
    8192,
    minimum=64,
    doc='A longer line is cut (`"truncated": true`).',
)
LOGS_FOLLOW_POLL_MS = env_int(
    "LOGS_FOLLOW_POLL_MS",
    1000,
    minimum=50,
    doc="How often a follower looks at the output and at the instance.",
)

section("readiness")
READYZ_CACHE_SECONDS = env_int(
    "READYZ_CACHE_SECONDS",
    15,
    minimum=1,
    doc=(
        "The workers' ping goes out at most this often; its answer is shared in Redis "
        "by every web process."
    ),
)
READYZ_PING_TIMEOUT_MS = env_int(
    "READYZ_PING_TIMEOUT_MS",
    1000,
    minimum=50,
    doc="How long the ping waits for replies.",
)
READYZ_BEAT_GRACE_FACTOR = env_int(
    "READYZ_BEAT_GRACE_FACTOR",
    3,
    minimum=1,
    doc=(
        "Beat counts as alive when it sent a task within its shortest interval times "
        "this (plus `READYZ_CACHE_SECONDS`)."
    ),
)
READYZ_REQUIRE_WORKERS = env_bool(
    "READYZ_REQUIRE_WORKERS",
    True,
    doc=(
        "`false`: `/readyz` checks PostgreSQL and Redis only (a web-only deployment "
        "whose workers are monitored elsewhere)."
    ),
)
