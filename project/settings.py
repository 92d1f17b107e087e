"""Settings for the workspace control plane: one module, read from the environment.

Every value has a local default that works against PostgreSQL and Redis on 127.0.0.1. A malformed
value stops start-up with a message naming the variable (see ``project.env``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

from django.core.exceptions import ImproperlyConfigured

from project.env import (
    env_bool,
    env_choice,
    env_database,
    env_int,
    env_int_map,
    env_list,
    env_optional_int,
    env_redis_url,
    env_str,
    env_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-secret-key-change-me")
if not DEBUG and SECRET_KEY.startswith("dev-only") and env_bool("REQUIRE_SECRET_KEY", False):
    raise ImproperlyConfigured("SECRET_KEY must be set when REQUIRE_SECRET_KEY is true")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "workspaces",
    "provisioning",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

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
    "default": env_database("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/workspaces"),
}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

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
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "workspaces.api.pagination.WorkspacePagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "workspaces.api.errors.exception_handler",
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

# --- Redis and Celery -------------------------------------------------------------------------
REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")

# Longest a lifecycle cycle may run before the worker kills it (hard) or interrupts it (soft).
CYCLE_TIME_LIMIT_SECONDS = env_int("CYCLE_TIME_LIMIT_SECONDS", 300, minimum=10)
CYCLE_SOFT_TIME_LIMIT_SECONDS = CYCLE_TIME_LIMIT_SECONDS - 5
SWEEP_TIME_LIMIT_SECONDS = env_int("SWEEP_TIME_LIMIT_SECONDS", 120, minimum=10)
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
    env_int("CELERY_VISIBILITY_TIMEOUT_SECONDS", 2 * CYCLE_TIME_LIMIT_SECONDS, minimum=60),
    CYCLE_TIME_LIMIT_SECONDS + 60,
    SWEEP_TIME_LIMIT_SECONDS + 60,
)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS,
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_LIFECYCLE_QUEUE", "lifecycle")
CELERY_SWEEP_QUEUE = env_str("CELERY_SWEEP_QUEUE", "sweeps")

# Beat intervals (seconds). Exactly one beat process must run; sweeps are also safe to overlap.
SWEEP_PROVISIONING_INTERVAL_SECONDS = env_int("SWEEP_PROVISIONING_INTERVAL_SECONDS", 30, minimum=1)
REDRIVE_INTERVAL_SECONDS = env_int("REDRIVE_INTERVAL_SECONDS", 30, minimum=1)

# --- The gate (per-workspace Redis lock) ------------------------------------------------------
# A holder renews its lease every GATE_LEASE_SECONDS / 3; a dead holder frees the gate within
# GATE_LEASE_SECONDS.
GATE_LEASE_SECONDS = env_int("GATE_LEASE_SECONDS", 30, minimum=3)
GATE_KEY_PREFIX = env_str("GATE_KEY_PREFIX", "wsgate")
# How long a task whose gate is busy waits before it asks again (it never blocks a worker).
GATE_BUSY_RETRY_SECONDS = env_int("GATE_BUSY_RETRY_SECONDS", 2, minimum=1)

# --- Workspaces --------------------------------------------------------------------------------
WORKSPACE_BACKENDS = ("docker", "process")
WORKSPACE_BACKEND = env_choice("WORKSPACE_BACKEND", "process", WORKSPACE_BACKENDS)
WORKSPACE_TEMPLATES_DIR = Path(
    env_str("WORKSPACE_TEMPLATES_DIR", str(BASE_DIR / "workspace_templates"))
).resolve()
WORKSPACE_DEFAULT_TEMPLATE = env_str("WORKSPACE_DEFAULT_TEMPLATE", "shell-default")
PLATFORM_URL = env_url("PLATFORM_URL", "http://127.0.0.1:8000")
# Where the process backend keeps each workspace's config directory, pid file and log.
WORKSPACE_DATA_DIR = Path(env_str("WORKSPACE_DATA_DIR", str(BASE_DIR / "var" / "workspaces")))
STOP_GRACE_SECONDS = env_int("STOP_GRACE_SECONDS", 10, minimum=0)

# Provisioning timeouts: PROVISION_TIMEOUT_SECONDS > manifest > per-runtime default > 600 s.
PROVISION_TIMEOUT_SECONDS = env_optional_int("PROVISION_TIMEOUT_SECONDS", minimum=1)
RUNTIME_PROVISION_TIMEOUTS = env_int_map(
    "RUNTIME_PROVISION_TIMEOUTS", {"hermes": 1800, "claude-code": 900}
)
DEFAULT_PROVISION_TIMEOUT_SECONDS = 600

# --- Stuck-provisioning sweeper (provisioning/sweeper.py) ---------------------------------------
# Beat runs it every SWEEP_PROVISIONING_INTERVAL_SECONDS (above); `manage.py sweep_provisioning`
# runs it once. In-flight rows are read in batches of this size (keyset over the partial index).
SWEEP_PROVISIONING_BATCH_SIZE = env_int("SWEEP_PROVISIONING_BATCH_SIZE", 500, minimum=1)
# A row whose flip raised is skipped by later sweeps for this long (a poison row is pushed
# forward instead of failing every sweep).
SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS = env_int(
    "SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS", 300, minimum=1
)

# Docker backend.
DOCKER_HOST = env_str("DOCKER_HOST", "")
DOCKER_NETWORK_MODE = env_str("DOCKER_NETWORK_MODE", "host")
DOCKER_AGENT_IMAGE = env_str("DOCKER_AGENT_IMAGE", "workspace-agent:dev")
DOCKER_CONFIG_MOUNT = env_str("DOCKER_CONFIG_MOUNT", "/workspace/config")
DOCKER_TIMEOUT_SECONDS = env_int("DOCKER_TIMEOUT_SECONDS", 30, minimum=1)
# Docker backend: labels, start wait and the agent image build.
# Every container and volume the platform creates carries ``<prefix>.platform=<PLATFORM_ID>``;
# listing and orphan cleanup only ever touch objects with this platform's label, so several
# control planes (or test sessions) can share one engine.
PLATFORM_ID = env_str("PLATFORM_ID", "default")
DOCKER_LABEL_PREFIX = env_str("DOCKER_LABEL_PREFIX", "io.workspaces")
# Pinned engine API version, or "auto" to ask the engine (one extra call per process).
DOCKER_API_VERSION = env_str("DOCKER_API_VERSION", "auto")
# How long start() waits for the engine to report the container running.
DOCKER_START_WAIT_SECONDS = env_int("DOCKER_START_WAIT_SECONDS", 20, minimum=1)
# Where `manage.py build_agent_image` takes the static busybox binary from (Debian's
# busybox-static package installs it at /bin/busybox).
DOCKER_AGENT_BUSYBOX = env_str("DOCKER_AGENT_BUSYBOX", "/bin/busybox")

# --- Reconciliation, liveness and live events ---------------------------------------------------
# One reconciliation pass compares every non-removed workspace with its backend (one
# list_instances() call per backend) and repairs drift; see provisioning/reconciler.py.
RECONCILE_INTERVAL_SECONDS = env_int("RECONCILE_INTERVAL_SECONDS", 60, minimum=1)
# An online or degraded workspace whose last heartbeat is older than this becomes offline. Keep it
# several agent heartbeat intervals (AGENT_HEARTBEAT_SECONDS, default 5) long.
LIVENESS_WINDOW_SECONDS = env_int("LIVENESS_WINDOW_SECONDS", 30, minimum=1)
LIVENESS_SWEEP_INTERVAL_SECONDS = env_int("LIVENESS_SWEEP_INTERVAL_SECONDS", 10, minimum=1)
# Server-Sent Events: each open stream holds one web thread (gunicorn --threads) for at most
# EVENTS_STREAM_MAX_SECONDS; then it ends and the client reconnects with Last-Event-ID.
EVENTS_STREAM_MAX_SECONDS = env_int("EVENTS_STREAM_MAX_SECONDS", 300, minimum=1)
EVENTS_STREAM_KEEPALIVE_SECONDS = env_int("EVENTS_STREAM_KEEPALIVE_SECONDS", 15, minimum=1)
# What the stream tells EventSource clients to wait before reconnecting.
EVENTS_STREAM_RETRY_MS = env_int("EVENTS_STREAM_RETRY_MS", 2000, minimum=0)
# Redis pub/sub channels are shared by every database of a Redis server, so the default prefix
# names the database, like the keys it sits beside.
_redis_url = urlparse(REDIS_URL)
_redis_db = parse_qs(_redis_url.query).get("db", [""])[0] or (
    _redis_url.path.strip("/") if _redis_url.scheme != "unix" else ""
)
EVENTS_CHANNEL_PREFIX = env_str("EVENTS_CHANNEL_PREFIX", f"wsevents:{_redis_db or '0'}")

# --- Logging -------------------------------------------------------------------------------------
LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
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
