"""The web process and what every process shares: Django, the database, Redis, the REST API,
request limits, logging."""

from __future__ import annotations

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from project.env import (
    env_bool,
    env_choice,
    env_database,
    env_fernet_keys,
    env_int,
    env_list,
    env_redis_url,
    env_str,
    section,
)

# The checkout: project/settings/web.py is three levels below it.
BASE_DIR = Path(__file__).resolve().parent.parent.parent

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
    # Innermost, so it sees the view's exceptions: a lost database or Redis is a 503. Sync only,
    # so that the chain above runs in one thread per request (see its docstring).
    "portal.api.middleware.WebServiceUnavailableMiddleware",
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
            # psycopg_pool's own default: a burst of creates on a busy host queues for a
            # connection instead of answering 503 after a shorter wait.
            30,
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

section("core")
RETRY_AFTER_SECONDS = env_int(
    "RETRY_AFTER_SECONDS",
    5,
    minimum=1,
    doc="The `Retry-After` of a 503 (the database or the broker is unreachable).",
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
