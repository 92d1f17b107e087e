"""Test settings: the project's settings with test defaults for the services.

Tests run against real PostgreSQL (pytest-django creates ``test_<name>``) and real Redis. The
Redis database defaults to 15 and is flushed at the start of a session; set REDIS_URL to use
another.
"""

import ipaddress
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

# Metrics from every process of the session (this one, its live server, the Celery workers it
# starts) are summed from one folder, as gunicorn workers and Celery children are in production.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"ws-test-metrics-{os.getpid()}"),
)
# One live-server address for the session and every process it starts (workers inherit it), so
# they agree on the registry port the workspace firewall lets through: agents call the live
# server (tests that want them to register point PLATFORM_URL at it, see `platform_url`).
if "DJANGO_LIVE_TEST_SERVER_ADDRESS" not in os.environ:
    import socket

    with socket.socket() as _probe:
        _probe.bind(("127.0.0.1", 0))
        _port = _probe.getsockname()[1]
    os.environ["DJANGO_LIVE_TEST_SERVER_ADDRESS"] = f"127.0.0.1:{_port}"
os.environ.setdefault(
    "WORKSPACE_REGISTRY_PORT", os.environ["DJANGO_LIVE_TEST_SERVER_ADDRESS"].rsplit(":", 1)[1]
)
# The live server is the session's web process: browsers, API clients and the proxy's
# forward_auth reach the platform there (PLATFORM_URL is what agents call).
os.environ.setdefault(
    "PLATFORM_PUBLIC_URL", f"http://{os.environ['DJANGO_LIVE_TEST_SERVER_ADDRESS']}"
)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The session's own proxy (tests/conftest.py starts Caddy on these when a test asks for it), so
# no test ever writes routes into another proxy on this machine.
os.environ.setdefault("PROXY_ADMIN", f"127.0.0.1:{_free_port()}")
os.environ.setdefault("PROXY_BIND", f"127.0.0.1:{_free_port()}")

from project.settings import *  # noqa: E402, F403

os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

# Django's test client sends Host: testserver; only the test settings accept it. The live server
# is also the registry that isolated process workspaces call, at their link's gateway (a deployment
# runs the registry listener, which needs no host name; tests/conftest.py binds the live server
# where links reach it): the gateways of the session's uids.
_low, _high = WORKSPACE_UID_RANGE  # noqa: F405
_links = ipaddress.IPv4Network(PROCESS_LINK_SUBNET)  # noqa: F405
ALLOWED_HOSTS = [
    *ALLOWED_HOSTS,  # noqa: F405
    "testserver",
    *(str(_links.network_address + 2 * slot) for slot in range(_high - _low + 1)),
]

# A scripted fake backend that real worker processes can run (tests/fakes.py).
EXTRA_BACKEND_FACTORIES = {"scripted": "tests.fakes.scripted_backend"}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
