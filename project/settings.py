"""Settings for the workspace control plane: one module, read from the environment.

Every value has a local default that works against PostgreSQL and Redis on 127.0.0.1. A malformed
value stops start-up with a message naming the variable (see ``project.env``).

Each reader's ``doc=`` is its text in the configuration reference (docs/configuration.md, printed
by ``python -m project.env``), under the section the last ``section(...)`` call above it names; a
comment beside a reader says only what its doc does not: why.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from django.core.exceptions import ImproperlyConfigured

from project.env import (
    env_bool,
    env_choice,
    env_database,
    env_fernet_keys,
    env_float,
    env_int,
    env_int_map,
    env_int_range,
    env_list,
    env_optional_int,
    env_redis_url,
    env_str,
    env_url,
    section,
)

BASE_DIR = Path(__file__).resolve().parent.parent

section("core")
DEBUG = env_bool("DJANGO_DEBUG", False, doc="Django debug mode.")

section("secrets")
SECRET_KEY = env_str(
    "SECRET_KEY",
    "dev-only-insecure-secret-key-change-me",
    doc="Django's secret key: set it in production.",
    shown="(a development key)",
)
if (
    not DEBUG
    and SECRET_KEY.startswith("dev-only")
    and env_bool(
        "REQUIRE_SECRET_KEY",
        False,
        doc=(
            "When true (production), start-up refuses the development `SECRET_KEY` and the "
            "development `ENV_ENCRYPTION_KEYS`."
        ),
    )
):
    raise ImproperlyConfigured("SECRET_KEY must be set when REQUIRE_SECRET_KEY is true")
# Workspace env values are encrypted at rest with these Fernet keys (comma-separated): the first
# encrypts, every one decrypts, so a new key is put first, `manage.py rotate_env_key` re-encrypts
# every row with it, and then the old key is dropped. The default is a public development key.
DEV_ENV_ENCRYPTION_KEY = "ZGV2LW9ubHktaW5zZWN1cmUtZW52LWtleS0wMDAwMDA="
ENV_ENCRYPTION_KEYS = env_fernet_keys(
    "ENV_ENCRYPTION_KEYS",
    [DEV_ENV_ENCRYPTION_KEY],
    doc=(
        "Fernet keys that encrypt workspace env values: the first encrypts, every one "
        "decrypts (key rotation: docs/operating.md). Give web, worker and beat the same"
        " value."
    ),
    shown="(a public development key)",
)
if (
    not DEBUG
    and DEV_ENV_ENCRYPTION_KEY in ENV_ENCRYPTION_KEYS
    and env_bool("REQUIRE_SECRET_KEY", False)
):
    raise ImproperlyConfigured(
        "ENV_ENCRYPTION_KEYS must be set to keys of your own when REQUIRE_SECRET_KEY is true"
    )

section("core")
ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS",
    ["localhost", "127.0.0.1", "[::1]"],
    doc="Host names the web process answers (the test settings add `testserver`).",
)
CSRF_TRUSTED_ORIGINS = env_list(
    "CSRF_TRUSTED_ORIGINS",
    [],
    doc=(
        "Origins trusted for the dashboard's and the admin's forms when they are served"
        " behind a proxy on another origin (Django's setting)."
    ),
)
# A CSRF refusal on the API's paths is JSON like every API error; HTML elsewhere.
CSRF_FAILURE_VIEW = "portal.api.errors.csrf_failure"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "workspaces",
    "provisioning",
    "portal",
]

MIDDLEWARE = [
    # First: an oversized body or a NUL in a header or query parameter is refused before
    # anything else reads the request.
    "portal.api.middleware.RequestGuardMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Innermost, so it sees the view's exceptions: a lost database or Redis is a 503.
    "portal.api.middleware.ServiceUnavailableMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
# The registry listener (project/registry_asgi.py sets PLATFORM_LISTENER=registry) serves the
# agents' endpoints alone: a URLconf of those, any other path a JSON 404, and only the
# middleware an agent call needs (no sessions, CSRF, messages or static files: agents send a
# bearer token and JSON). Agents call it by whatever address reaches the host from their
# network, and the token, not the Host header, is what it trusts: it answers every Host.
PLATFORM_LISTENER = env_choice(
    "PLATFORM_LISTENER",
    "web",
    ("web", "registry"),
    doc=(
        "Which of the platform's listeners this process is; `project/registry_asgi.py` sets"
        " `registry`. Not set by hand."
    ),
)
if PLATFORM_LISTENER == "registry":
    ROOT_URLCONF = "project.registry_urls"
    ALLOWED_HOSTS = ["*"]
    MIDDLEWARE = [
        "portal.api.middleware.RequestGuardMiddleware",
        "portal.api.middleware.ServiceUnavailableMiddleware",
    ]
# So that clients that stall (a workspace that opens connections and sends half a request, an
# agent stopped mid-call) cannot keep requests open.
REQUEST_BODY_SECONDS = env_int(
    "REQUEST_BODY_SECONDS",
    10,
    minimum=1,
    doc=(
        "A request to the API or the registry listener whose body has not arrived whole"
        " by then is answered 408 before Django reads it."
    ),
)

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env_database(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/workspaces",
        doc="PostgreSQL (required; nothing else is supported).",
    ),
}
DATABASES["default"]["CONN_MAX_AGE"] = env_int(
    "DATABASE_CONN_MAX_AGE",
    60,
    minimum=0,
    doc=(
        "Seconds a database connection is kept for reuse (Django's `CONN_MAX_AGE`; `0` "
        "closes it after each request); connections are health-checked before reuse."
    ),
)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# The ASGI entry points (project/asgi.py, project/registry_asgi.py) set DATABASE_POOL: Django runs
# each request's sync part in a thread of its own there, so connections come from psycopg's pool
# (at most DATABASE_POOL_MAX_SIZE per process, a request waits up to DATABASE_POOL_TIMEOUT seconds
# for one, then 503) instead of one kept per thread. Celery workers and manage.py keep theirs.
if _application_name := env_str(
    "DATABASE_APPLICATION_NAME",
    "",
    doc=(
        "The name each process gives its database connections "
        "(`pg_stat_activity.application_name`); the ASGI entry points set `web` and "
        "`registry`; empty: none."
    ),
):
    DATABASES["default"].setdefault("OPTIONS", {})["application_name"] = _application_name
if env_bool(
    "DATABASE_POOL",
    False,
    doc=(
        "Take database connections from psycopg's pool (at most "
        "`DATABASE_POOL_MAX_SIZE` per process) instead of one kept per thread; "
        "`CONN_MAX_AGE` is then 0. The ASGI entry points (web and registry listener) "
        "set it; Celery workers and `manage.py` keep their connections."
    ),
):
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int(
            "DATABASE_POOL_MAX_SIZE",
            10,
            minimum=1,
            doc="With `DATABASE_POOL`: the most connections a process's pool opens.",
        ),
        "timeout": env_int(
            "DATABASE_POOL_TIMEOUT",
            10,
            minimum=1,
            doc=(
                "With `DATABASE_POOL`: how long a request waits for a connection from the pool,"
                " then 503."
            ),
        ),
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
FORMAT_MODULE_PATH = ["project.formats"]  # timestamps with seconds (project/formats/en)

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

# --- REST API ---------------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: an anonymous call gets 401 with a WWW-Authenticate header, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.api.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "portal.api.pagination.WorkspacePagination",
    "DEFAULT_SCHEMA_CLASS": "portal.api.schema.AutoSchema",
    # JSON only: a form or multipart body cannot carry ``env`` (a map), so none is accepted (415).
    "DEFAULT_PARSER_CLASSES": ["portal.api.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # Escape non-ASCII in responses: an error that echoes input can never fail to encode.
    "UNICODE_JSON": False,
    "EXCEPTION_HANDLER": "portal.api.errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Workspace control plane",
    "DESCRIPTION": "Create, start, stop, restart and delete workspaces; agents register back.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

section("limits")
# The default fits the largest valid env (MAX_ENV_TOTAL_BYTES, 256 KiB, even at JSON's worst
# escaping) with room to spare; Django's own form limit follows it.
API_MAX_BODY_BYTES = env_int(
    "API_MAX_BODY_BYTES",
    2 * 1024 * 1024,
    minimum=64 * 1024,
    doc=("Largest request body; 413 above it. Below about 1.6 MiB some valid envs cannot be sent."),
)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
WORKSPACE_QUOTA_PER_USER = env_int(
    "WORKSPACE_QUOTA_PER_USER",
    100,
    minimum=0,
    doc=(
        "Workspaces (any status but `removed`) per non-staff user; a team counts its "
        "parent and every member. `0`: no quota."
    ),
)
WORKSPACE_QUOTA_RETRY_AFTER_SECONDS = env_int(
    "WORKSPACE_QUOTA_RETRY_AFTER_SECONDS",
    60,
    minimum=1,
    doc="`Retry-After` of a quota 429.",
)
PROVISIONING_CONCURRENCY_LIMIT = env_int(
    "PROVISIONING_CONCURRENCY_LIMIT",
    100,
    minimum=0,
    doc=(
        "Cycles in flight platform-wide (requested and not finished, or provisioning "
        "until the agent registers) above which create, start and restart answer 429. "
        "`0`: no cap."
    ),
)
PROVISIONING_RETRY_AFTER_SECONDS = env_int(
    "PROVISIONING_RETRY_AFTER_SECONDS",
    10,
    minimum=1,
    doc="`Retry-After` of a cap 429.",
)

section("core")
REDIS_URL = env_redis_url(
    "REDIS_URL",
    "redis://127.0.0.1:6379/0",
    doc="Celery broker, the per-workspace gate, stream places and live events.",
)

section("celery")
CYCLE_TIME_LIMIT_SECONDS = env_int(
    "CYCLE_TIME_LIMIT_SECONDS",
    300,
    minimum=10,
    doc=(
        "Hard time limit of a cycle task (the soft limit is 5 s less; when it fires the"
        " cycle fails with `source=lifecycle` and stops what it started). A task "
        "message carries the limits of the process that sent it, so give web, worker "
        "and beat the same value."
    ),
)
CYCLE_SOFT_TIME_LIMIT_SECONDS = CYCLE_TIME_LIMIT_SECONDS - 5
SWEEP_TIME_LIMIT_SECONDS = env_int(
    "SWEEP_TIME_LIMIT_SECONDS",
    120,
    minimum=10,
    doc=("Hard time limit of a sweep task (the soft limit is 5 s less), and its lock's lifetime."),
)
SWEEP_SOFT_TIME_LIMIT_SECONDS = SWEEP_TIME_LIMIT_SECONDS - 5

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True
# A killed worker's task goes back to the queue (acks_late + reject_on_worker_lost) ...
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = CYCLE_TIME_LIMIT_SECONDS
CELERY_TASK_SOFT_TIME_LIMIT = CYCLE_SOFT_TIME_LIMIT_SECONDS
# ... and an unacked message is redelivered only after visibility_timeout, which must exceed the
# longest task, or a slow but healthy task would be delivered twice.
CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS = max(
    env_int(
        "CELERY_VISIBILITY_TIMEOUT_SECONDS",
        2 * CYCLE_TIME_LIMIT_SECONDS,
        minimum=60,
        doc=(
            "How long Redis keeps a task a dead worker had taken before delivering it "
            "again; never less than 60 s above either time limit."
        ),
        shown="(twice `CYCLE_TIME_LIMIT_SECONDS`)",
    ),
    CYCLE_TIME_LIMIT_SECONDS + 60,
    SWEEP_TIME_LIMIT_SECONDS + 60,
)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS,
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# On a broker connection loss, terminate the running late-ack tasks and leave their messages
# unacked (they are redelivered; the redrive sweep re-enqueues their intents from the rows): their
# gate lease lived in the same Redis and is lost anyway, and a task acking after the reconnect
# would ack on the channel of the connection that was dropped. Celery 6 makes True the default.
# (The worker's death on a Redis restart, AttributeError("'NoneType' object has no attribute
# 'hostname'"), is Celery 5.7.0's: see the pin in pyproject.toml and docs/faults.md.)
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# A request enqueues after its commit; with the broker down it must not hang the request: try a
# few times quickly, then leave the intent to the redrive sweep (the row is the outbox).
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": env_int(
        "ENQUEUE_MAX_RETRIES",
        2,
        minimum=0,
        doc=(
            "Quick publish retries after a commit before leaving the intent to the redrive sweep."
        ),
    ),
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
CELERY_WORKER_SEND_TASK_EVENTS = False
# Celery closes every database connection after each task unless this is set; then it closes them
# every 2 x this many tasks, and project.celery's task_prerun hook closes only old or broken ones.
CELERY_DB_REUSE_MAX = 500
CELERY_TASK_DEFAULT_QUEUE = env_str(
    "CELERY_LIFECYCLE_QUEUE",
    "lifecycle",
    doc="The queue of lifecycle cycles (Celery's default queue).",
)
CELERY_SWEEP_QUEUE = env_str(
    "CELERY_SWEEP_QUEUE",
    "sweeps",
    doc=(
        "The queue of the sweeps (stuck provisioning, liveness, idle, redrive) and the "
        "reconciliation passes."
    ),
)

section("timeouts")
# Beat intervals (seconds). Exactly one beat process must run; sweeps are also safe to overlap.
SWEEP_PROVISIONING_INTERVAL_SECONDS = env_int(
    "SWEEP_PROVISIONING_INTERVAL_SECONDS",
    30,
    minimum=1,
    doc="How often beat runs the stuck-provisioning sweep.",
)

section("celery")
REDRIVE_INTERVAL_SECONDS = env_int(
    "REDRIVE_INTERVAL_SECONDS",
    30,
    minimum=1,
    doc=(
        "How often beat re-enqueues workspaces whose request waited that long with no "
        "gate held (after a whole worker node died)."
    ),
)

CONVERGE_MAX_RETRIES = env_int(
    "CONVERGE_MAX_RETRIES",
    5,
    minimum=0,
    doc=(
        "Retries of a cycle task after a transient backend error (engine unreachable, "
        "timeout, 5xx); the attempt after the last retry fails the workspace "
        "(`WORKSPACE_PROVISION_FAILED`, `source=backend`, `payload.transient` true, the"
        ' engine\'s message and "still failing on the final attempt").'
    ),
)
CONVERGE_RETRY_BACKOFF_SECONDS = env_int(
    "CONVERGE_RETRY_BACKOFF_SECONDS",
    2,
    minimum=1,
    doc="First retry delay; it doubles per retry (jittered, at most 60 s).",
)

section("core")
RETRY_AFTER_SECONDS = env_int(
    "RETRY_AFTER_SECONDS",
    5,
    minimum=1,
    doc="The `Retry-After` of a 503 (the database or the broker is unreachable).",
)

section("gate")
GATE_LEASE_SECONDS = env_int(
    "GATE_LEASE_SECONDS",
    30,
    minimum=3,
    doc=(
        "Lease of a held gate; renewed every third of it while the cycle runs. A holder"
        " that dies frees the gate within this time."
    ),
)
GATE_KEY_PREFIX = env_str(
    "GATE_KEY_PREFIX",
    "wsgate",
    doc=("Redis key prefix of the gates (`<prefix>:<workspace id>`) and their bookkeeping."),
)
GATE_BUSY_RETRY_SECONDS = env_int(
    "GATE_BUSY_RETRY_SECONDS",
    2,
    minimum=1,
    doc=(
        "When a task finds the gate busy, one retry per workspace comes back after this"
        " long (it never blocks a worker)."
    ),
)

WORKSPACE_BACKENDS = ("docker", "process", "swarm")

section("workspaces")
WORKSPACE_BACKEND = env_choice(
    "WORKSPACE_BACKEND",
    "process",
    WORKSPACE_BACKENDS,
    doc=("Where new workspaces run: local processes, Docker containers, or Swarm services."),
)
# Backends registered by dotted path, name -> factory. Never read from the environment: only the
# test settings register one (a scripted backend that runs inside real worker processes).
EXTRA_BACKEND_FACTORIES: dict[str, str] = {}
WORKSPACE_TEMPLATES_DIR = Path(
    env_str(
        "WORKSPACE_TEMPLATES_DIR",
        str(BASE_DIR / "workspace_templates"),
        doc="Template manifests, one folder each.",
        shown="./workspace_templates",
    )
).resolve()
WORKSPACE_DEFAULT_TEMPLATE = env_str(
    "WORKSPACE_DEFAULT_TEMPLATE",
    "shell-default",
    doc=(
        "The template `manage.py workspace create` uses without `--template`, and the "
        "one the dashboard's create form shows first."
    ),
)
PLATFORM_URL = env_url(
    "PLATFORM_URL",
    "http://127.0.0.1:8001",
    doc=(
        "What agents call back: the registry listener, which serves `/api/registry/*` "
        "alone. On the Docker backend its host part is replaced by each workspace "
        "network's gateway address."
    ),
)
WORKSPACE_DATA_DIR = Path(
    env_str(
        "WORKSPACE_DATA_DIR",
        str(BASE_DIR / "var" / "workspaces"),
        doc="The process backend's per-workspace folders (config, home, pid file, output).",
        shown="./var/workspaces",
    )
)
STOP_GRACE_SECONDS = env_int(
    "STOP_GRACE_SECONDS",
    10,
    minimum=0,
    doc="A stop sends SIGTERM, then SIGKILL after this long.",
)

section("isolation")
# Process backend: "uid" runs each workspace as its own unprivileged uid/gid from
# WORKSPACE_UID_RANGE behind a firewall; "none" runs workspaces as the platform's own user, for
# single-user development only (then only one owner may have workspaces on this backend).
WORKSPACE_PROCESS_ISOLATION = env_choice(
    "WORKSPACE_PROCESS_ISOLATION",
    "uid",
    ("uid", "none"),
    doc=(
        "`uid`: a uid per workspace (needs root); `none`: unisolated, single-user development only."
    ),
)
WORKSPACE_UID_RANGE = env_int_range(
    "WORKSPACE_UID_RANGE",
    (200000, 200999),
    minimum=1000,
    doc=("Uids (and gids) handed to process-backend workspaces; at most that many live at once."),
)
# The Python that runs the platform's agent (and `{python}` in a manifest's command) on the
# process backend. Workspace uids must be able to run it: the platform's own virtualenv may sit
# in a folder they cannot enter. The agent needs only the standard library.
WORKSPACE_PYTHON = env_str(
    "WORKSPACE_PYTHON",
    "/usr/bin/python3",
    doc=(
        "The interpreter of the process backend's agent (copied under "
        "`WORKSPACE_DATA_DIR/.agent/`, so workspace uids never read the checkout; every"
        " folder above `WORKSPACE_DATA_DIR` must be enterable by them, `o+x`, or the "
        "backend refuses to start saying so)."
    ),
)
# Without isolation the platform's own interpreter is used.
WORKSPACE_APPS_PYTHON = env_str(
    "WORKSPACE_APPS_PYTHON",
    "/opt/workspace-apps/bin/python",
    doc=(
        "`{python}` in a template's app command under uid isolation: a virtualenv of "
        "the system Python with the `apps` group (JupyterLab), made by `bin/apps-venv`."
    ),
)
WORKSPACE_FIREWALL_CHAIN = env_str(
    "WORKSPACE_FIREWALL_CHAIN",
    "WS-ISOLATION",
    doc=(
        "The nftables table (`inet`) the process backend owns, and the prefix of the "
        "Docker bridges' iptables chain (`<name>-BRIDGE`)."
    ),
)
WORKSPACE_REGISTRY_PORT = env_optional_int(
    "WORKSPACE_REGISTRY_PORT",
    minimum=1,
    doc=(
        "The one host port workspaces may connect to from their links; unset: the port "
        "of `PLATFORM_URL`. Every platform process of the host must agree."
    ),
)
WORKSPACE_HIDDEN_PATHS = env_list(
    "WORKSPACE_HIDDEN_PATHS",
    [
        "/var/run/postgresql",
        "/run/postgresql",
        "/var/run/redis",
        "/run/redis",
        "/var/run/docker.sock",
        "/run/docker.sock",
    ],
    doc=(
        "Paths hidden from process workspaces (an empty tmpfs or /dev/null in their mount "
        "namespace) when outside `WORKSPACE_PRIVATE_PATHS`."
    ),
    shown="(PostgreSQL's, Redis's and Docker's socket paths under /run and /var/run)",
)

# What a process workspace's mount namespace gives it of its own: each folder an empty tmpfs, so the
# host's sockets, shared memory and temporary files in them are absent without anyone naming them
# (the workspace's own folder under WORKSPACE_DATA_DIR is bound back in when it lies below one).
WORKSPACE_PRIVATE_PATHS = env_list(
    "WORKSPACE_PRIVATE_PATHS",
    ["/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm"],
    doc=(
        "Folders a process workspace gets as empty ones of its own (tmpfs in its mount "
        "namespace): the host's sockets and files in them are absent."
    ),
)

section("timeouts")
# Provisioning timeouts: PROVISION_TIMEOUT_SECONDS > manifest > per-runtime default > 600 s.
PROVISION_TIMEOUT_SECONDS = env_optional_int(
    "PROVISION_TIMEOUT_SECONDS",
    minimum=1,
    doc="Global override of every provisioning timeout.",
)
RUNTIME_PROVISION_TIMEOUTS = env_int_map(
    "RUNTIME_PROVISION_TIMEOUTS",
    {"hermes": 1800, "claude-code": 900},
    doc=("Per-runtime provisioning timeouts, used when a manifest gives none (then 600 s)."),
)
DEFAULT_PROVISION_TIMEOUT_SECONDS = 600

# --- Stuck-provisioning sweeper (provisioning/sweeper.py) ---------------------------------------
# Beat runs it every SWEEP_PROVISIONING_INTERVAL_SECONDS (above); `manage.py sweep_provisioning`
# runs it once. In-flight rows are read in batches of this size (keyset over the partial index).
SWEEP_PROVISIONING_BATCH_SIZE = env_int(
    "SWEEP_PROVISIONING_BATCH_SIZE",
    500,
    minimum=1,
    doc="In-flight rows the sweep reads per query.",
)
# A row whose flip raised is skipped by later sweeps for this long (a poison row is pushed
# forward instead of failing every sweep).
SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS = env_int(
    "SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS",
    300,
    minimum=1,
    doc="How long a row that made the sweep fail is left alone.",
)

section("pools")
# Warm pools (docs/operating.md "Warm pools"): per template, instances kept running and waiting so
# that a create claims one instead of starting cold. The manifest's `pool: {size: N}` says how
# many; this overrides it per template (0 switches a template's pool off).
WORKSPACE_POOL_SIZES = env_int_map(
    "WORKSPACE_POOL_SIZES",
    {},
    minimum=0,
    unit="size",
    doc=(
        "Per-template warm pool sizes (`shell-default=5,jupyterlab=0`), overriding the "
        "manifests' `pool.size`; `0` switches a pool off."
    ),
)
POOL_SWEEP_INTERVAL_SECONDS = env_int(
    "POOL_SWEEP_INTERVAL_SECONDS",
    15,
    minimum=1,
    doc=(
        "How often beat runs the pool sweep (refill, retire changed or failed members); a "
        "claim also asks for a refill at once."
    ),
)
# A claim's refill waits this long after the template's latest claim: a burst of creates is
# served by the pool first, and its members' replacements start once it is over (started during
# it, they take the CPU its hand-overs need: on 2 cores, 50 claims took 3 s instead of 1).
POOL_REFILL_DELAY_SECONDS = env_float(
    "POOL_REFILL_DELAY_SECONDS",
    1.0,
    doc=(
        "A pool is refilled this long after its latest claim (claims within it push the "
        "refill on), so replacements never compete with a burst's hand-overs."
    ),
)
WORKSPACE_POOL_OWNER = env_str(
    "WORKSPACE_POOL_OWNER",
    "_pool",
    doc=(
        "The username that owns unclaimed pool members (made inactive, without a password); "
        "no person may use it."
    ),
)

section("idle")
IDLE_TIMEOUT_SECONDS = env_int(
    "IDLE_TIMEOUT_SECONDS",
    0,
    minimum=0,
    doc=(
        "Idle timeout of templates whose manifest has no "
        "`runtime_config.idle_timeout_seconds`; `0`: never."
    ),
)
IDLE_SWEEP_INTERVAL_SECONDS = env_int(
    "IDLE_SWEEP_INTERVAL_SECONDS",
    60,
    minimum=1,
    doc="How often beat runs the idle sweep.",
)
IDLE_SWEEP_BATCH_SIZE = env_int(
    "IDLE_SWEEP_BATCH_SIZE",
    500,
    minimum=1,
    doc="Rows read per batch by the idle sweep.",
)
# services.record_activity (the proxy's per-request signal) writes a workspace's row at most once
# per this many seconds. An idle timeout shorter than this counts as this long, so an activity
# skipped by the rate limit can never be the one whose absence stops a workspace.
ACTIVITY_WRITE_INTERVAL_SECONDS = env_int(
    "ACTIVITY_WRITE_INTERVAL_SECONDS",
    30,
    minimum=1,
    doc=(
        "`record_activity` writes a workspace's row at most this often; shorter idle "
        "timeouts count as this long."
    ),
)

section("docker")
DOCKER_HOST = env_str(
    "DOCKER_HOST",
    "",
    doc=(
        "The engine, `unix://…` or `tcp://…`; empty: the Docker SDK's default "
        "(`unix:///var/run/docker.sock`)."
    ),
)
# "veth" (default): each container starts with networking disabled and the worker gives it a
# link of its own, a veth pair to the host (a /31 of DOCKER_VETH_SUBNET); needs the worker as root
# on the engine's host. "workspace": one internal bridge network per workspace, made and removed
# through the engine (a worker in a container, a remote engine; costs the engine about 0.17 s of
# CPU more per start, docs/architecture.md). "host": the host's network stack, an opt-in that
# lets workspaces reach every service listening on the host (README "Workspace isolation").
DOCKER_NETWORK_MODE = env_choice(
    "DOCKER_NETWORK_MODE",
    "veth",
    ("veth", "workspace", "host"),
    doc=(
        "`veth`: a link per workspace that the worker makes (root on the engine's "
        "host); `workspace`: one internal network per workspace, made through the "
        "engine; `host`: the host's network (an opt-in with a risk, docs/operating.md)."
    ),
)
# DOCKER_NETWORK_MODE=veth: the IPv4 range of the links. A workspace takes the /31 its slot picks
# (its isolation uid's offset in WORKSPACE_UID_RANGE): the even address is the host's end (its
# gateway), the odd one the container's. It must hold one /31 per uid of the range and be used by
# nothing else on the host.
DOCKER_VETH_SUBNET = env_str(
    "DOCKER_VETH_SUBNET",
    "10.213.0.0/16",
    doc=(
        "`veth`: the IPv4 range of the links, a /31 per uid of `WORKSPACE_UID_RANGE` "
        "(start-up refuses a range too small); used by nothing else on the host."
    ),
)
try:
    _veth_subnet = ipaddress.IPv4Network(DOCKER_VETH_SUBNET)
except ValueError as _exc:
    raise ImproperlyConfigured(
        f"DOCKER_VETH_SUBNET must be an IPv4 network such as 10.213.0.0/16: {_exc}"
    ) from None
_links, _uids = _veth_subnet.num_addresses // 2, WORKSPACE_UID_RANGE[1] - WORKSPACE_UID_RANGE[0] + 1
if _links < _uids:
    raise ImproperlyConfigured(
        f"DOCKER_VETH_SUBNET={DOCKER_VETH_SUBNET} holds {_links} /31 links, fewer than the "
        f"{_uids} uids of WORKSPACE_UID_RANGE (one link per live workspace)"
    )
# A workspace network's bridge (veth: the host end of its link) is named this prefix + the start
# of the workspace id (15 characters in all), so the host firewall matches them all with one
# wildcard.
DOCKER_BRIDGE_PREFIX = env_str(
    "DOCKER_BRIDGE_PREFIX",
    "wsbr",
    doc=(
        "The name prefix of workspace networks' bridges and of links' host ends (1-6 "
        "lowercase letters or digits), which the host firewall matches."
    ),
)
if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", DOCKER_BRIDGE_PREFIX):
    raise ImproperlyConfigured(
        "DOCKER_BRIDGE_PREFIX must be 1 to 6 lowercase letters or digits, starting with a letter"
    )
# The process backend's links (WORKSPACE_PROCESS_ISOLATION=uid): each workspace's network
# namespace reaches the host over a veth pair, the /31 of this range its uid's offset picks (even
# address: the host's end, odd: the workspace's), the host end named PROCESS_LINK_PREFIX + the
# uid, so whatever an earlier holder of the uid left is found by name and replaced. The same
# range as Docker's links by default: a uid is held by one live workspace of either backend. The
# prefix is the process backend's own, so the Docker bridges' iptables chain and the process
# links' nftables table each police their own links only.
PROCESS_LINK_PREFIX = env_str(
    "PROCESS_LINK_PREFIX",
    "wspl",
    doc=(
        "The name prefix of process workspaces' links' host ends (1-6 lowercase letters or"
        " digits; the uid follows it), which the process backend's nftables table matches."
    ),
    section="isolation",
)
if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", PROCESS_LINK_PREFIX):
    raise ImproperlyConfigured(
        "PROCESS_LINK_PREFIX must be 1 to 6 lowercase letters or digits, starting with a letter"
    )
if len(PROCESS_LINK_PREFIX) + len(str(WORKSPACE_UID_RANGE[1])) > 15:
    raise ImproperlyConfigured(
        f"PROCESS_LINK_PREFIX={PROCESS_LINK_PREFIX!r} and the uids of WORKSPACE_UID_RANGE name "
        "the links' host ends (prefix + uid), which the kernel caps at 15 characters: shorten "
        "the prefix"
    )
if PROCESS_LINK_PREFIX.startswith(DOCKER_BRIDGE_PREFIX) or DOCKER_BRIDGE_PREFIX.startswith(
    PROCESS_LINK_PREFIX
):
    raise ImproperlyConfigured(
        f"PROCESS_LINK_PREFIX={PROCESS_LINK_PREFIX!r} and DOCKER_BRIDGE_PREFIX="
        f"{DOCKER_BRIDGE_PREFIX!r} must not be the start of one another: each backend's "
        "firewall matches its own prefix"
    )
PROCESS_LINK_SUBNET = env_str(
    "PROCESS_LINK_SUBNET",
    DOCKER_VETH_SUBNET,
    doc=(
        "The IPv4 range of process workspaces' links to the host, a /31 per uid of "
        "`WORKSPACE_UID_RANGE`; unset: `DOCKER_VETH_SUBNET`."
    ),
    section="isolation",
    shown="(DOCKER_VETH_SUBNET)",
)
try:
    _link_subnet = ipaddress.IPv4Network(PROCESS_LINK_SUBNET)
except ValueError as _exc:
    raise ImproperlyConfigured(
        f"PROCESS_LINK_SUBNET must be an IPv4 network such as 10.213.0.0/16: {_exc}"
    ) from None
if _link_subnet.num_addresses // 2 < _uids:
    raise ImproperlyConfigured(
        f"PROCESS_LINK_SUBNET={PROCESS_LINK_SUBNET} holds {_link_subnet.num_addresses // 2} /31 "
        f"links, fewer than the {_uids} uids of WORKSPACE_UID_RANGE (one link per live workspace)"
    )
# The host firewall for workspace bridges (<WORKSPACE_FIREWALL_CHAIN>-BRIDGE): without it, a
# workspace reaches every host service listening on all addresses (PostgreSQL, sshd, ...) at its
# gateway. "auto": installed whenever the workspace's bridge is in this host's network namespace
# (the engine runs here), and a launch fails naming the error when it cannot be; a bridge
# elsewhere (a remote engine) is logged: its host needs the same rules. "on": as auto, and a
# bridge that is not here fails the launch. "off": never installed (the engine's host is
# firewalled by other means).
DOCKER_HOST_FIREWALL = env_choice(
    "DOCKER_HOST_FIREWALL",
    "auto",
    ("auto", "on", "off"),
    doc=(
        "The host firewall for workspace bridges: `auto` installs it when the bridge is"
        " on this host, `on` also fails a launch whose bridge is not, `off` never "
        "installs it."
    ),
)
# The non-root user containers run as, and their default limits (a manifest's `resources`
# block overrides them).
DOCKER_WORKSPACE_USER = env_str(
    "DOCKER_WORKSPACE_USER",
    "10001:10001",
    doc=(
        "Numeric `uid:gid` containers run as (and own their config files); the agent "
        "image is built with it."
    ),
)
DOCKER_DEFAULT_MEMORY = env_str(
    "DOCKER_DEFAULT_MEMORY",
    "512m",
    doc="Memory limit of a container whose manifest has no `resources`.",
)
DOCKER_DEFAULT_CPUS = env_float(
    "DOCKER_DEFAULT_CPUS",
    1.0,
    doc="CPU limit of a container whose manifest has no `resources`.",
)
DOCKER_DEFAULT_PIDS = env_int(
    "DOCKER_DEFAULT_PIDS",
    256,
    minimum=1,
    doc="Process limit of a container whose manifest has no `resources`.",
)

section("proxy")
DOCKER_APP_HOST = env_str(
    "DOCKER_APP_HOST",
    "127.0.0.1",
    doc=(
        "Where the proxy reaches a host-networked container's app; a container with an "
        "address of its own is reached there instead."
    ),
)

section("docker")
DOCKER_AGENT_IMAGE = env_str(
    "DOCKER_AGENT_IMAGE",
    "workspace-agent:dev",
    doc="Image of templates without `image:`, and the tag `build_agent_image` builds.",
)
DOCKER_CONFIG_MOUNT = env_str(
    "DOCKER_CONFIG_MOUNT",
    "/workspace/config",
    doc="Config volume mount point unless the template sets `config_mount`.",
)
# How a container's config volume gets the template's files. "image": the backend builds (once
# per template content) an image FROM the agent image with the files at DOCKER_CONFIG_MOUNT, and
# the engine copies them into the volume when the container is created and the volume is empty
# (first provision and recovery alike; the agent reports the copy). "archive": the platform
# writes them with one put_archive per provision, which costs the engine about as much as the
# container's creation. Templates with their own `command` (no platform agent) use "archive".
DOCKER_CONFIG_DELIVERY = env_choice(
    "DOCKER_CONFIG_DELIVERY",
    "image",
    ("image", "archive"),
    doc=(
        "How the config volume gets the template's files: `image` (the engine copies "
        "them from a config image into an empty volume; the agent reports it) or "
        "`archive` (one `put_archive` per provision). Templates with their own "
        "`command` use `archive`."
    ),
)
DOCKER_CONFIG_IMAGE = env_str(
    "DOCKER_CONFIG_IMAGE",
    "workspace-config",
    doc="The repository of the config images (tags `<template>-<digest>`).",
)
DOCKER_TIMEOUT_SECONDS = env_int(
    "DOCKER_TIMEOUT_SECONDS", 30, minimum=1, doc="Timeout of one engine call."
)
PLATFORM_ID = env_str(
    "PLATFORM_ID",
    "default",
    doc=(
        "Value of the `<prefix>.platform` label; listing and orphan cleanup touch only "
        "containers and volumes carrying this platform's value, so several control "
        "planes can share one engine."
    ),
)
DOCKER_LABEL_PREFIX = env_str("DOCKER_LABEL_PREFIX", "io.workspaces", doc="Prefix of every label.")
DOCKER_API_VERSION = env_str(
    "DOCKER_API_VERSION",
    "auto",
    doc="Engine API version to speak (`auto` asks the engine once per process).",
)
DOCKER_START_WAIT_SECONDS = env_int(
    "DOCKER_START_WAIT_SECONDS",
    20,
    minimum=1,
    doc="How long a start waits for the engine to report the container running.",
)
DOCKER_AGENT_BUSYBOX = env_str(
    "DOCKER_AGENT_BUSYBOX",
    "/bin/busybox",
    doc=(
        "Static busybox binary copied into the agent image (Debian's `busybox-static` "
        "installs it at `/bin/busybox`)."
    ),
)

section("swarm")
SWARM_MANAGER_HOST = env_str(
    "SWARM_MANAGER_HOST",
    "",
    doc=(
        "A manager's engine (`unix://…` or `tcp://…`); empty: `DOCKER_HOST`. Lets the "
        "Docker and Swarm backends run side by side, on two engines or on one (the "
        "Docker backend skips the containers of Swarm tasks, which carry the same "
        "labels)."
    ),
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

section("restart")
# The manifest's `restart: on-failure | never`: a workspace whose instance dies while wanted
# running is restarted after
# min(RESTART_BACKOFF_BASE_SECONDS * 2 ** (deaths in the window - 1), RESTART_BACKOFF_MAX_SECONDS);
# the RESTART_MAX_FAILURES-th death within RESTART_FAILURE_WINDOW_SECONDS makes it `failed`.
RESTART_BACKOFF_BASE_SECONDS = env_int(
    "RESTART_BACKOFF_BASE_SECONDS",
    5,
    minimum=1,
    doc="The first restart's delay; doubles with each death in the window.",
)
RESTART_BACKOFF_MAX_SECONDS = env_int(
    "RESTART_BACKOFF_MAX_SECONDS", 300, minimum=1, doc="The longest delay."
)
RESTART_MAX_FAILURES = env_int(
    "RESTART_MAX_FAILURES",
    5,
    minimum=1,
    doc="Deaths within the window after which the workspace is `failed`.",
)
RESTART_FAILURE_WINDOW_SECONDS = env_int(
    "RESTART_FAILURE_WINDOW_SECONDS", 900, minimum=1, doc="The window."
)
DEATH_OUTPUT_LINES = env_int(
    "DEATH_OUTPUT_LINES",
    20,
    minimum=0,
    doc="Lines of output a death event and `last_error` carry.",
)

section("core")
# --- Logging -------------------------------------------------------------------------------------
LOG_LEVEL = env_choice(
    "LOG_LEVEL",
    "INFO",
    ("DEBUG", "INFO", "WARNING", "ERROR"),
    doc="Level of the `workspaces` and `provisioning` loggers.",
)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "workspaces": {"level": LOG_LEVEL},
        "provisioning": {"level": LOG_LEVEL},
    },
}
