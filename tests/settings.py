"""Test settings: the project's settings with test defaults for the services.

Tests run against real PostgreSQL (pytest-django creates ``test_<name>``) and real Redis. The
Redis database defaults to 15 and is flushed at the start of a session; set REDIS_URL to use
another.
"""

import os
import tempfile

os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("WORKSPACE_BACKEND", "process")
os.environ.setdefault("GATE_KEY_PREFIX", "test-wsgate")
# Docker objects of this session carry this platform label; teardown removes exactly those.
os.environ.setdefault("PLATFORM_ID", f"test-{os.getpid()}")
os.environ.setdefault("STOP_GRACE_SECONDS", "3")
os.environ.setdefault(
    "WORKSPACE_DATA_DIR", os.path.join(tempfile.gettempdir(), f"ws-test-data-{os.getpid()}")
)

from project.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
