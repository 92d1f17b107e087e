"""The platform as a person runs it, for the tests of record: ``bin/run`` itself, which starts the
Procfile's processes under supervisord (the web process, the registry listener, a Celery worker,
Celery beat and Caddy), here on the test database, a Redis database, ports, uids, a firewall
table and a run folder of its own, so it shares nothing with the session's other workers.

Tests talk to it over HTTP as clients do, and read the database to check what it wrote. Its
broker and gates live in their own Redis database: a test enqueues nothing to it from this
process (create through its API instead).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from tests.support import REPO, database_url, free_port, wait_for


def _redis_db_url(slot: int) -> str:
    """The session's Redis server, a database of the stack's own below the session's (a
    session on database 15: 14 for slot 0, 13 for slot 1)."""
    parsed = urllib.parse.urlparse(settings.REDIS_URL)
    db = int(parsed.path.lstrip("/") or 0)
    own = db - 1 - slot if db > slot else db + 1 + slot
    return parsed._replace(path=f"/{own}").geturl()


@dataclass
class Answer:
    """An HTTP answer, read the way tests read the test client's."""

    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class Client:
    """A REST client of the stack's web process with a user's token, over HTTP."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack, self.token = stack, token

    def _call(self, method: str, path: str, body: dict | None = None) -> Answer:
        status, headers, content = self.stack.request(
            method, path, body, {"Authorization": f"Token {self.token}"}
        )
        return Answer(status, headers, content)

    def get(self, path: str, params: dict[str, Any] | None = None) -> Answer:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return self._call("GET", path + query)

    def post(self, path: str, body: dict | None = None) -> Answer:
        return self._call("POST", path, body)

    def patch(self, path: str, body: dict) -> Answer:
        return self._call("PATCH", path, body)

    def delete(self, path: str) -> Answer:
        return self._call("DELETE", path)


def _uid_range(slot: int) -> str:
    """The range after the session's own (the session's 200000-200999: 201000-201999 for slot
    0), so that neither firewall table meets the other's uids."""
    low, high = settings.WORKSPACE_UID_RANGE
    shift = (high - low + 1) * (slot + 1)
    return f"{low + shift}-{high + shift}"


def _link_subnet(slot: int) -> str:
    """A slice of the session's link range after the one its own uids use: the stack's links
    (process workspaces have one each) meet neither the session's nor another person's."""
    session = ipaddress.IPv4Network(settings.PROCESS_LINK_SUBNET)
    low, high = settings.WORKSPACE_UID_RANGE
    size = math.ceil(math.log2(2 * (high - low + 1)))
    return str(list(session.subnets(new_prefix=32 - size))[slot + 1])


class Stack:
    """``bin/run`` with the environment a deployment would give it; ``env`` adds settings.
    Stacks of different ``slot`` run side by side: each has its own slice of the machine
    (Redis database, uids and their firewall table, the Docker links' addresses)."""

    def __init__(self, templates: Path, env: dict[str, str] | None = None, slot: int = 0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="stack-"))
        self.directory.chmod(0o711)  # workspace uids pass through it to their own folders
        self.web_port, self.registry_port = free_port(), free_port()
        self.proxy_port, self.proxy_admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.registry_url = f"http://127.0.0.1:{self.registry_port}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.redis_url = _redis_db_url(slot)
        self.data_dir = self.directory / "workspaces"
        self.log_path = self.directory / "run.log"
        keep = ("PATH", "LANG", "LC_ALL", "TZ", "DOCKER_HOST", "UV_CACHE_DIR", "TMPDIR")
        self.env = {name: os.environ[name] for name in keep if name in os.environ}
        self.env.update(
            HOME=str(self.directory),
            XDG_CONFIG_HOME=str(self.directory / "config"),
            XDG_DATA_HOME=str(self.directory / "data"),
            PYTHONUNBUFFERED="1",
            DJANGO_SETTINGS_MODULE="project.settings",
            DATABASE_URL=database_url(),
            REDIS_URL=self.redis_url,
            RUN_DIR=str(self.directory / "run"),
            BIND=f"127.0.0.1:{self.web_port}",
            REGISTRY_BIND=f"0.0.0.0:{self.registry_port}",
            PLATFORM_URL=self.registry_url,
            PLATFORM_PUBLIC_URL=self.url,
            WORKSPACE_REGISTRY_PORT=str(self.registry_port),
            PROXY_BIND=f"127.0.0.1:{self.proxy_port}",
            PROXY_ADMIN=f"127.0.0.1:{self.proxy_admin_port}",
            WEB_CONCURRENCY="2",
            WORKER_CONCURRENCY="2",
            WORKSPACE_BACKEND="process",
            WORKSPACE_DATA_DIR=str(self.data_dir),
            WORKSPACE_TEMPLATES_DIR=str(templates),
            WORKSPACE_UID_RANGE=_uid_range(slot),
            WORKSPACE_FIREWALL_CHAIN=f"{settings.WORKSPACE_FIREWALL_CHAIN}_stack{slot}",
            DOCKER_VETH_SUBNET=_link_subnet(slot),
            # Links named so that no host firewall matching the session's prefix (or the
            # default's, another platform's) takes the stack's links for its own.
            DOCKER_BRIDGE_PREFIX=f"s{slot}{settings.DOCKER_BRIDGE_PREFIX[:4]}",
            PROCESS_LINK_PREFIX=f"s{slot}{settings.PROCESS_LINK_PREFIX[:4]}",
            GATE_KEY_PREFIX=f"stack{slot}-wsgate",
            PLATFORM_ID=f"stack{slot}-{os.getpid()}",
            STOP_GRACE_SECONDS="3",
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> Stack:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()  # no gate or task of an earlier run
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(REPO / "bin" / "run")],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, timeout=timeout, interval=0.5, message="bin/run's stack ready")
        return self

    def _ready(self) -> bool:
        """Every process answers: /readyz checks the database, Redis, a worker's ping and beat's
        last tick; the registry listener and Caddy's admin API answer on their ports."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"bin/run exited: {self.log()[-4000:]}")
        try:
            status, _, _ = self.request("GET", "/readyz")
            registry, _, _ = self.request("GET", "/", base=self.registry_url)
            with socket.create_connection(("127.0.0.1", self.proxy_admin_port), timeout=1):
                pass
        except OSError:
            return False
        return status == 200 and registry == 404

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: dict[str, str] | None = None,
        *,
        base: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to the stack (the web process unless ``base`` says otherwise):
        status, headers (lower-case names), body. Raises OSError when nothing answers: an empty
        answer (a closed connection) is an error, never a status."""
        parsed = urllib.parse.urlparse(base or self.url)
        sent = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(
            parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout
        )
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            content = response.read()
            answered = {name.lower(): value for name, value in response.getheaders()}
            return response.status, answered, content
        finally:
            conn.close()

    def api(
        self, method: str, path: str, token: str, body: dict | None = None, **headers: str
    ) -> tuple[int, Any]:
        """An API call with a user's token: status and decoded JSON."""
        status, answered, content = self.request(
            method, path, body, {"Authorization": f"Token {token}", **headers}
        )
        assert answered.get("content-type", "").startswith("application/json"), (
            status,
            answered,
            content[:300],
        )
        return status, json.loads(content) if content else None

    def client(self, token: str) -> Client:
        return Client(self, token)

    def pids(self) -> list[int]:
        """Every process of bin/run's session (it started one of its own): supervisord and the
        programs under it, which keep that session even when their parent is gone."""
        if self.proc is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == self.proc.pid:  # the session id
                    found.append(int(entry.name))
        return found

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to bin/run, which passes it to supervisord (as Ctrl-C would), which stops its
        programs; what is left of its session after ``timeout`` is killed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop_workspaces(self) -> None:
        """Stop every workspace process the stack's worker started (its data folder)."""
        from provisioning.backends.process import ProcessBackend

        if not self.data_dir.exists():
            return
        backend = ProcessBackend(self.data_dir)
        for info in backend.list_instances():
            with contextlib.suppress(Exception):
                backend.stop(uuid.UUID(info.workspace_id), {}, grace_seconds=0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        shutil.copy(self.log_path, Path(tempfile.gettempdir()) / "stack-run.log")
        shutil.rmtree(self.directory, ignore_errors=True)
