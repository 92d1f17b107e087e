"""The peer: JupyterHub with DockerSpawner against this platform's Docker backend, on the same
private engine, in one run.

Both sides run as their users run them, each started by this bench as child processes:

* **hub**: JupyterHub (its own sqlite database, the hub's default) with configurable-http-proxy
  (from npm, installed into ``var/peer/node_modules``) and DockerSpawner with 4 engine threads
  (its default is one shared thread; 4 matches the platform's Celery worker concurrency). Each
  server is the platform's agent image (the same FROM-scratch busybox image) with a command that
  starts busybox ``httpd`` on the port the spawner picked and posts its activity to the hub's API
  once (as jupyterhub-singleuser does when it starts). The hub waits until the server answers
  HTTP, then adds its route to the proxy: that is "ready".
* **here**: gunicorn (API: 2 uvicorn workers, 4 threads each), the registry listener (1
  process, uvicorn, 4 threads), one Celery worker (prefork, 4) and Caddy as the proxy, on the
  Docker backend;
  template ``shell-default`` (the agent starts busybox ``httpd`` on the app port, registers once
  it answers; the proxy serves a workspace as soon as its row says it is up,
  with no route of its own to write): "online".

A round sends N requests at once through each side's REST API (``POST /hub/api/users/<name>/
server`` for N users created before the round, answered 202 at once like the platform's 201;
``POST /api/workspaces/``) and polls each side's REST API every 0.5 s (``GET /hub/api/users?
state=ready``, ``GET /api/workspaces/?status=online``) until all N are up. Per server, latency is
its request being sent to the moment each side records it up: here the ``WORKSPACE_ONLINE`` event
(the agent's registration, after which the proxy serves it), on the hub the
return of the proxy's ``add_user`` (recorded by a one-line subclass in the hub's config; the hub
marks the server ready right after). The round's total is the first request to the last one up.
CPU per workspace is read from ``/proc`` around the round (before cleanup): the engine (dockerd,
containerd, shims), the control plane (hub + configurable-http-proxy; gunicorn + registry +
Celery + Caddy) and, here, the PostgreSQL backends serving the bench's database and the platform's
Redis (a redis-server the bench starts for it alone). The hub keeps its state in sqlite inside
its own process, so the issue's comparison is here's control plane + PostgreSQL + Redis against
the hub's control plane. Rounds alternate (which side goes first flips every round) and
everything is removed between rounds, untimed.

Containers on both sides run as uid 10001 with every capability dropped, ``no-new-privileges``,
512 MiB, 1 CPU and 256 pids. What differs, by design of each product: the hub's servers use the
host's network; each workspace here gets a network link of its own (``DOCKER_NETWORK_MODE=veth``,
the default: the container starts with networking disabled and the worker wires a veth pair into
it; ``--network workspace``: an internal bridge network made through the engine, created and
removed with it; ``--network host``: the host's network, the backend's documented opt-out), a
config volume the engine fills from the template's config image as it creates the
container, a per-workspace token, rows and events in PostgreSQL and a gate in Redis, and a
heartbeat every 10 s (``AGENT_HEARTBEAT_SECONDS``).

Not in CI and not a default dependency group::

    uv sync --group peer          # jupyterhub, dockerspawner, matplotlib
    python -m bench peer [--sizes 1 10 50 200] [--rounds 3] [--network veth|workspace|host]
    python -m bench peer --backend process [--sizes 1 10 50 200 500]   # bench.peer_process

Uses the engine in ``DOCKER_HOST`` (``BENCH_DOCKERD_ROOT``: the engine's folder, to find its
processes) or a private dockerd, ``DATABASE_URL`` (default ``ws_peer_bench``) and ``REDIS_URL``.
Writes its block of docs/benchmarks.md (one per ``--network``, between markers that ``python -m
bench`` keeps) and the plot ``docs/peer-<network>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import percentile, postgres_backends, setup_django, write_block
from bench.engine import _TICKS, cpu_by_root, cpu_seconds
from bench.stack import (
    REPO,
    Platform,
    _stop,
    free_port,
    platform,
    private_redis,
    remove_labelled,
    wait_until,
)

PEER_DIR = REPO / "var" / "peer"
CHP = PEER_DIR / "node_modules" / ".bin" / "configurable-http-proxy"
CHP_VERSION = "4"
HUB_THREADS = 4
RESENDS = 3  # times a hub request whose connection was reset is sent again
TIMEOUT = 900.0
CLEAN_TIMEOUT = 180.0
DOC = REPO / "docs" / "benchmarks.md"
PLOT = "peer-{variant}.png"
# Each variant (this platform's DOCKER_NETWORK_MODE) writes its block between its markers;
# ``python -m bench`` keeps every such block when it rewrites the report.
MARKERS = re.compile(r"<!-- peer:(\w+):begin -->.*?<!-- peer:\1:end -->\n?", re.DOTALL)


def markers(variant: str) -> tuple[str, str]:
    return f"<!-- peer:{variant}:begin -->", f"<!-- peer:{variant}:end -->"


LABEL_KEY = "io.workspaces.bench-peer"
PHASES = {
    "queue": "POST sent -> cycle began",
    "cycle": "cycle began -> container running (network, volume, config, create, start)",
    "agent": "container running -> registered (app answers, register call)",
}

# The hub's server: busybox httpd on the spawner's port, one activity post to the hub, and a
# TERM trap (a shell as pid 1 ignores SIGTERM, and the hub's stop would wait 10 s per server).
SERVER_SCRIPT = r"""
trap 'kill $httpd 2>/dev/null; exit 0' TERM INT
httpd -f -p 127.0.0.1:{port} -h /www & httpd=$!
now=$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)
at="{{\"last_activity\": \"$now\"}}"
wget -q -O /dev/null \
  --header "Authorization: token $JUPYTERHUB_API_TOKEN" \
  --header "Content-Type: application/json" \
  --post-data "{{\"last_activity\": \"$now\", \"servers\": {{\"\": $at}}}}" \
  "$JUPYTERHUB_API_URL/users/$JUPYTERHUB_USER/activity" || echo "activity post failed"
wait $httpd
"""

# The hub's part of jupyterhub_config.py, common to every variant; each variant's ``Hub`` adds
# its spawner's part (which defines ``PeerSpawner``).
HUB_CONFIG = '''
import time

from jupyterhub.proxy import ConfigurableHTTPProxy
from jupyterhub.utils import random_port

c = get_config()  # noqa: F821


class PeerProxy(ConfigurableHTTPProxy):
    """Records when each server's route is in the proxy: the last step before "ready"."""

    async def add_user(self, user, server_name=""):
        await super().add_user(user, server_name)
        with open("{folder}/ready.log", "a") as log:
            log.write(f"{{user.name}} {{time.time()}}\\n")


c.JupyterHub.proxy_class = PeerProxy
# The API answers 202 at once instead of waiting up to 10 s for the spawn (as the platform's
# POST answers 201 before the cycle runs); this also avoids a race in the hub's wait under load.
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}

c.JupyterHub.bind_url = "http://127.0.0.1:{proxy_port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.JupyterHub.db_url = "sqlite:///{folder}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{folder}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{folder}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.log_level = "WARN"
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.active_server_limit = 0
c.JupyterHub.api_page_default_limit = 1000
c.JupyterHub.api_page_max_limit = 1000
c.JupyterHub.cleanup_servers = True
c.JupyterHub.services = [{{"name": "bench", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [
    {{
        "name": "bench",
        "scopes": ["admin:users", "admin:servers", "list:users", "read:users"],
        "services": ["bench"],
    }}
]
c.Spawner.start_timeout = {timeout}
c.Spawner.http_timeout = {timeout}
'''

DOCKER_SPAWNER_CONFIG = '''
from concurrent.futures import ThreadPoolExecutor

from dockerspawner import DockerSpawner

SCRIPT = {script!r}


class PeerSpawner(DockerSpawner):
    """Host networking: a free host port per server, reached on the loopback."""

    async def start(self):
        self.port = random_port()
        return await super().start()

    async def get_ip_and_port(self):
        return "127.0.0.1", self.port

    async def get_command(self):
        return [SCRIPT.format(port=self.port)]

    def get_args(self):
        return []


# DockerSpawner calls the engine from one class-wide executor, one thread by default.
PeerSpawner._executor = ThreadPoolExecutor({threads})

c.JupyterHub.spawner_class = PeerSpawner
c.DockerSpawner.image = {image!r}
c.DockerSpawner.pull_policy = "never"
c.DockerSpawner.network_name = "host"
# No port bindings (host networking refuses them); the address is the loopback (above).
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.remove = True
c.DockerSpawner.name_template = "peer-{{username}}"
c.DockerSpawner.mem_limit = "512M"
c.DockerSpawner.cpu_limit = 1.0
c.DockerSpawner.extra_create_kwargs = {{
    "entrypoint": ["/bin/sh", "-c"],
    "user": {user!r},
    "labels": {{{label_key!r}: {run_id!r}}},
}}
c.DockerSpawner.extra_host_config = {{
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges:true"],
    "pids_limit": 256,
}}
'''


@dataclass
class Run:
    total: float
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds the round cost, by part
    # Here only: per-workspace seconds in each phase (see PHASES), from the rows and events.
    phases: dict[str, list[float]] = field(default_factory=dict)
    # Hub only: requests whose connection the hub reset before answering, sent again.
    resent: int = 0

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)


def ensure_proxy() -> Path:
    """configurable-http-proxy from npm into var/peer (node and npm from Debian)."""
    if CHP.exists():
        return CHP
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: apt-get install -y nodejs npm")
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    package = f"configurable-http-proxy@{CHP_VERSION}"
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(PEER_DIR), package],
        check=True,
    )
    return CHP


def _call(
    port: int, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers = {**headers, "Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, (json.loads(data) if data else {})
        except ValueError:
            return response.status, data.decode(errors="replace")
    finally:
        conn.close()


class Hub:
    """JupyterHub + configurable-http-proxy as child processes, stopped by pid. A variant says
    what its spawner is (``spawner_config``), what its servers leave behind (``remove_leftovers``)
    and how the CPU the hub's side spent splits (``cpu``)."""

    def __init__(self, log_dir: Path) -> None:
        chp = ensure_proxy()  # first: it makes var/peer on a fresh checkout
        self.folder = Path(tempfile.mkdtemp(prefix="hub-", dir=PEER_DIR))
        self.port = free_port()
        self.token = secrets.token_hex(32)
        self.run_id = uuid.uuid4().hex[:8]
        config = HUB_CONFIG.format(
            proxy_port=free_port(),
            hub_port=self.port,
            proxy_api_port=free_port(),
            chp=str(chp),
            folder=self.folder,
            token=self.token,
            timeout=int(TIMEOUT),
        )
        (self.folder / "jupyterhub_config.py").write_text(config + self.spawner_config())
        self.log_path = log_dir / "jupyterhub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawner_config(self) -> str:
        """The spawner's part of jupyterhub_config.py (it defines ``PeerSpawner``)."""
        raise NotImplementedError

    def remove_leftovers(self) -> None:
        """Remove whatever the hub's servers left (after a clean, and when the hub stops)."""
        raise NotImplementedError

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the hub's side, by part (see ``Run.cpu``)."""
        raise NotImplementedError

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return _call(self.port, method, f"/hub/api{path}", self.headers, body)

    def ready_times(self) -> dict[str, float]:
        """User name -> when its server's route went into the proxy (PeerProxy's record)."""
        times: dict[str, float] = {}
        path = self.folder / "ready.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            name, at = line.split()
            times.setdefault(name, float(at))
        return times

    def __enter__(self) -> Hub:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        log = open(self.log_path, "ab")  # lives as long as the hub
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyterhub"), "-f", "jupyterhub_config.py"],
            cwd=self.folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited: {self.log_path.read_text()[-3000:]}")
            try:
                return self.api("GET", "/users?limit=1")[0] == 200
            except OSError:
                return False

        try:
            wait_until(ready, 120, "jupyterhub", interval=0.3)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, timeout=60)
        self.remove_leftovers()
        shutil.rmtree(self.folder, ignore_errors=True)

    def clean(self) -> None:
        """Stop every server and delete every user (untimed), then remove what is left."""
        status, users = self.api("GET", "/users?limit=1000")
        names = [u["name"] for u in users] if status == 200 else []
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda name: self.api("DELETE", f"/users/{name}/server"), names))

        def stopped() -> bool:
            status, active = self.api("GET", "/users?state=active&limit=1000")
            return status == 200 and not active

        wait_until(stopped, CLEAN_TIMEOUT, "hub servers stopped", interval=0.3)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda name: self.api("DELETE", f"/users/{name}"), names))
        self.remove_leftovers()


class DockerHub(Hub):
    """The hub with DockerSpawner on the bench's engine; its containers carry a per-run label."""

    def __init__(self, image: str, user: str, log_dir: Path) -> None:
        self.image, self.user = image, user
        super().__init__(log_dir)

    @property
    def label(self) -> str:
        return f"{LABEL_KEY}={self.run_id}"

    def spawner_config(self) -> str:
        return DOCKER_SPAWNER_CONFIG.format(
            script=SERVER_SCRIPT,
            threads=HUB_THREADS,
            image=self.image,
            user=self.user,
            label_key=LABEL_KEY,
            run_id=self.run_id,
        )

    def remove_leftovers(self) -> None:
        remove_labelled(self.label)

    def cpu(self) -> dict[str, float]:
        assert self.proc is not None
        used = cpu_seconds([self.proc.pid])
        return {"engine": used["engine"], "control": used["platform"]}


def _together(n: int, task: Any) -> list[Any]:
    """Run ``task(index)`` in n threads released together (a barrier)."""
    barrier = threading.Barrier(n)

    def go(index: int) -> Any:
        barrier.wait()
        return task(index)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(go, range(n)))


def _requests_and_watch(
    n: int, request: Any, count: Any, failed: Any, interval: float, what: str
) -> dict[str, float]:
    """Send n requests at once (``request(index) -> (key, sent)``, in threads released together)
    while polling ``count()`` (how many are up) every ``interval`` until n are up; ``failed()``
    (checked every 2 s once every request has returned) names failures. Returns key -> sent."""
    with ThreadPoolExecutor(max_workers=1) as runner:
        requests = runner.submit(_together, n, request)
        last_check = time.monotonic()
        deadline = time.monotonic() + TIMEOUT
        while True:
            if requests.done():
                requests.result()  # a refused request fails the round
            if count() >= n and requests.done():
                break
            if requests.done() and time.monotonic() - last_check > 2:
                last_check = time.monotonic()
                bad = failed()
                if bad:
                    raise RuntimeError(f"{what}: {len(bad)} failed, e.g. {bad[0]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not all up after {TIMEOUT:.0f} s")
            time.sleep(interval)
        return dict(requests.result())


def _pg_backends(database: str) -> dict[int, float]:
    """pid -> CPU seconds of the PostgreSQL backends connected to ``database``."""
    pids = postgres_backends(database)
    found = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[pid] = sum(int(value) for value in fields[11:13]) / _TICKS
    return found


def hub_round(hub: Hub, n: int, interval: float) -> Run:
    tag = uuid.uuid4().hex[:6]
    names = [f"u{tag}-{index}" for index in range(n)]
    status, body = hub.api("POST", "/users", {"usernames": names})
    if status != 201:
        raise RuntimeError(f"POST /hub/api/users answered {status}: {body}")
    before = hub.cpu()
    resent: list[str] = []

    def spawn(index: int) -> tuple[str, float]:
        sent = time.time()
        for attempt in range(RESENDS + 1):
            try:
                status, body = hub.api("POST", f"/users/{names[index]}/server")
                break
            except (ConnectionResetError, http.client.RemoteDisconnected):
                # A full listen backlog while the hub's loop is busy: the request may or may
                # not have arrived. Sending it again is safe: a pending spawn answers 202 again,
                # a started one "already running"; the latency still counts from the first.
                if attempt == RESENDS:
                    raise
                resent.append(names[index])
                time.sleep(1)
        if status not in (201, 202) and not (resent and "already running" in str(body)):
            raise RuntimeError(f"POST /hub/api/users/<name>/server answered {status}: {body}")
        return names[index], sent

    def count() -> int:
        # The page's total counts active servers, ready or not: count the listed ones.
        status, users = hub.api("GET", "/users?state=ready&limit=1000")
        return len(users) if status == 200 else 0

    def failed() -> list[str]:
        # A server whose spawn failed is neither ready nor pending any more.
        status, users = hub.api("GET", "/users?state=inactive&limit=1000")
        return [u["name"] for u in users if u["name"] in names] if status == 200 else []

    sent = _requests_and_watch(n, spawn, count, failed, interval, f"hub N={n}")
    after = hub.cpu()
    ready = hub.ready_times()
    latencies = [ready[name] - sent[name] for name in sent]
    cpu = {part: after[part] - before[part] for part in after}
    total = max(ready[name] for name in sent) - min(sent.values())
    return Run(total, latencies, cpu, resent=len(resent))


def here_round(
    stack: Platform,
    database: str,
    n: int,
    interval: float,
    workspaces: Callable[[], dict[int, float]] | None = None,
) -> Run:
    """One round here. ``workspaces`` (pid -> CPU seconds of the workspaces' own processes) takes
    the engine's place when the workspaces are local processes."""
    from workspaces.models import Workspace

    tag = uuid.uuid4().hex[:6]
    before = cpu_seconds(stack.pids)
    redis = {"redis": stack.redis_pid} if stack.redis_pid else {}
    parts_before = cpu_by_root({**stack.parts, **redis})
    pg_before = _pg_backends(database)
    own_before = workspaces() if workspaces else {}

    def create(index: int) -> tuple[str, float]:
        sent = time.time()
        status, body = stack.request(
            "POST", "/api/workspaces/", {"name": f"w{tag}-{index}", "template": "shell-default"}
        )
        if status != 201:
            raise RuntimeError(f"POST /api/workspaces/ answered {status}: {body}")
        return str(body["id"]), sent

    def count() -> int:
        status, body = stack.request("GET", "/api/workspaces/?status=online&page_size=500")
        return len(body.get("results", [])) if status == 200 else 0

    def failed() -> list[str]:
        rows = Workspace.objects.filter(owner__username="bench-peer", status="failed")
        return [str(error) for error in rows.values_list("last_error", flat=True)]

    sent = _requests_and_watch(n, create, count, failed, interval, f"here N={n}")
    after = cpu_seconds(stack.pids)
    parts_after = cpu_by_root({**stack.parts, **redis})
    pg_after = _pg_backends(database)
    cpu = {
        "control": after["platform"] - before["platform"],
        **{f"control:{part}": parts_after[part] - parts_before[part] for part in stack.parts},
        "postgres": sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()),
    }
    if redis:
        cpu["redis"] = parts_after["redis"] - parts_before["redis"]
    if workspaces is None:
        cpu["engine"] = after["engine"] - before["engine"]
    else:
        own_after = workspaces()
        cpu["workspace"] = sum(cpu - own_before.get(pid, 0.0) for pid, cpu in own_after.items())
    online, began = _first_events(list(sent), "ONLINE"), _first_events(list(sent), "PROVISIONING")
    running = {
        str(key): at.timestamp()
        for key, at in Workspace.objects.filter(id__in=list(sent)).values_list(
            "id", "last_started_at"
        )
        if at is not None
    }
    latencies = [online[key] - sent[key] for key in sent]
    phases = {
        "queue": [began[key] - sent[key] for key in sent],
        "cycle": [running[key] - began[key] for key in sent],
        "agent": [online[key] - running[key] for key in sent],
    }
    return Run(max(online.values()) - min(sent.values()), latencies, cpu, phases)


def _first_events(ids: list[str], kind: str) -> dict[str, float]:
    """Workspace id -> when its first event of that kind was recorded."""
    from workspaces.models import WorkspaceEvent
    from workspaces.status import EventType

    rows = (
        WorkspaceEvent.objects.filter(workspace_id__in=ids, type=getattr(EventType, kind))
        # Newest first, so the dict keeps each workspace's first event of the kind.
        .order_by("-created_at")
        .values_list("workspace_id", "created_at")
    )
    return {str(workspace_id): at.timestamp() for workspace_id, at in rows}


def here_clean(stack: Platform) -> None:
    from django.conf import settings

    from workspaces.models import Workspace

    remove_labelled(f"{settings.DOCKER_LABEL_PREFIX}.platform={stack.platform_id}")
    Workspace.objects.filter(owner__username="bench-peer").delete()


def _median(runs: list[Run], what: str) -> float:
    if what in ("total", "p50"):
        return statistics.median(getattr(run, what) for run in runs)
    n = len(runs[0].latencies)
    return statistics.median(run.cpu.get(what, float("nan")) for run in runs) / n * 1000


def _median_sum(runs: list[Run], parts: tuple[str, ...]) -> float:
    """The median over rounds of the parts' CPU added up in each round, ms per workspace."""
    n = len(runs[0].latencies)
    return statistics.median(sum(run.cpu.get(p, 0.0) for p in parts) for run in runs) / n * 1000


@dataclass(frozen=True)
class Variant:
    """What a comparison calls its parts: the report's block and plot, the CPU column of the
    workspaces' own side, the phases here, the sides' names."""

    name: str  # the block's markers and the plot's name (a word: MARKERS)
    own: str  # the Run.cpu key of the workspaces' own side: "engine" or "workspace"
    own_column: str
    own_title: str
    phases: dict[str, str]
    here_label: str
    hub_label: str


def docker_variant(network: str) -> Variant:
    return Variant(
        name=network,
        own="engine",
        own_column="engine CPU/ws",
        own_title="engine: dockerd+containerd+shims",
        phases=PHASES,
        here_label="this platform (Docker backend)",
        hub_label="JupyterHub + DockerSpawner",
    )


def _resent(run: Run) -> str:
    return f" ({run.resent} reset, sent again)" if run.resent else ""


def report(
    runs: dict[tuple[str, int], list[Run]], sizes: list[int], args: Any, variant: Variant
) -> list[str]:
    lines = [
        f"| N | total: here | hub | ratio | p50: here | hub | ratio | {variant.own_column}: here "
        "| hub | ratio | control-plane CPU/ws: here | hub | ratio | PostgreSQL | Redis "
        "| control + PostgreSQL + Redis: here | ratio to the hub's control plane |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        here, hub = runs[("here", n)], runs[("hub", n)]
        cells = [str(n)]
        for what, unit in (("total", "s"), ("p50", "s"), (variant.own, "ms"), ("control", "ms")):
            a, b = _median(here, what), _median(hub, what)
            fmt = "{:.2f} " if unit == "s" else "{:.0f} "
            cells += [fmt.format(a) + unit, fmt.format(b) + unit, f"{a / b:.2f}" if b else "-"]
        postgres, redis = _median(here, "postgres"), _median(here, "redis")
        whole = _median_sum(here, ("control", "postgres", "redis"))
        cells += [f"{postgres:.0f} ms", f"{redis:.0f} ms", f"{whole:.0f} ms"]
        cells.append(f"{whole / _median(hub, 'control'):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Medians over {args.rounds} rounds per side and N; ratio = here / hub (below 1: this "
        "platform is ahead). Every round, total and p50 in seconds:"
    )
    lines.append("")
    for n in sizes:
        parts = []
        for side in ("here", "hub"):
            listed = ", ".join(f"{r.total:.2f}/{r.p50:.2f}{_resent(r)}" for r in runs[(side, n)])
            parts.append(f"{side} {listed}")
        lines.append(f"- N = {n}: " + "; ".join(parts))
    lines += ["", "Here, the control plane's CPU by process tree, median ms per workspace:", ""]
    for n in sizes:
        here = runs[("here", n)]
        names = sorted({key for run in here for key in run.cpu if key.startswith("control:")})
        split = ", ".join(f"{name[len('control:') :]} {_median(here, name):.0f}" for name in names)
        lines.append(f"- N = {n}: {split}")
    lines += ["", "Here, median seconds per workspace in each phase (all rounds):", ""]
    for n in sizes:
        parts = []
        for phase, meaning in variant.phases.items():
            values = [x for run in runs[("here", n)] for x in run.phases.get(phase, [])]
            if values:
                parts.append(f"{meaning} {statistics.median(values):.2f}")
        lines.append(f"- N = {n}: " + ", ".join(parts))
    return lines


def plot(
    runs: dict[tuple[str, int], list[Run]], sizes: list[int], path: Path, variant: Variant
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    sides = (
        ("here", "tab:blue", variant.here_label),
        ("hub", "tab:orange", variant.hub_label),
    )
    for side, colour, label in sides:
        totals = [_median(runs[(side, n)], "total") for n in sizes]
        p50s = [_median(runs[(side, n)], "p50") for n in sizes]
        axes[0].plot(sizes, totals, "o-", color=colour, label=f"{label}: total")
        axes[0].plot(sizes, p50s, "s--", color=colour, label=f"{label}: p50")
        own = [_median(runs[(side, n)], variant.own) for n in sizes]
        control = [_median(runs[(side, n)], "control") for n in sizes]
        axes[1].plot(sizes, own, "o-", color=colour, label=f"{label}: {variant.own}")
        axes[1].plot(sizes, control, "s--", color=colour, label=f"{label}: control plane")
    n_max = max(sizes)
    for side, colour, label in sides:
        values = sorted(x for run in runs[(side, n_max)] for x in run.latencies)
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axes[2].step(values, fractions, where="post", color=colour, label=label, linewidth=2)
    axes[0].set(
        xscale="log",
        xlabel="N requested at once",
        ylabel="seconds",
        title="first request to last up (total), per-server p50",
    )
    axes[1].set(
        xscale="log",
        xlabel="N requested at once",
        ylabel="CPU ms per workspace",
        title=f"CPU per workspace ({variant.own_title})",
    )
    axes[2].set(
        xlabel="per-server latency (s)",
        ylabel="fraction up",
        ylim=(0, 1.02),
        title=f"N = {n_max}: latency CDF, all rounds",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_doc(section: list[str], path: Path, variant: str) -> None:
    """Replace this variant's block of the report (between its markers), or append it."""
    write_block(path, *markers(variant), section)


def alternate(
    args: Any, here: Callable[[int], Run], clean_here: Callable[[], None], hub: Hub
) -> dict[tuple[str, int], list[Run]]:
    """One untimed round of one on each side (imports, connections, the page cache), then
    ``args.rounds`` rounds of each size on each side, the side that goes first flipping every
    round, cleaned after each round (untimed). Whatever is left is cleaned when it fails."""
    runs: dict[tuple[str, int], list[Run]] = {}
    try:
        clean_here()
        here(1)
        clean_here()
        hub_round(hub, 1, args.interval)
        hub.clean()
        for n in args.sizes:
            for index in range(args.rounds):
                order = ["here", "hub"] if index % 2 == 0 else ["hub", "here"]
                for side in order:
                    if side == "here":
                        result = here(n)
                        clean_here()
                    else:
                        result = hub_round(hub, n, args.interval)
                        hub.clean()
                    runs.setdefault((side, n), []).append(result)
                    cpu = ", ".join(f"{k} {v / n * 1000:.0f} ms/ws" for k, v in result.cpu.items())
                    print(
                        f"# N={n} round {index + 1} {side}: total {result.total:.2f} s, "
                        f"p50 {result.p50:.2f} s; CPU {cpu}"
                        + (f"; {result.resent} requests sent again" if result.resent else ""),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        clean_here()
        with contextlib.suppress(Exception):  # Hub.__exit__ removes what is left anyway
            hub.clean()
    return runs


def write_results(
    runs: dict[tuple[str, int], list[Run]],
    args: Any,
    argv: list[str] | None,
    variant: Variant,
    heading: list[str],
    started: float,
    load_before: list[str],
    spawner: str,
    setting: str,
) -> None:
    """The plot, the table on stdout, and the variant's block of the report: ``heading``, how
    and when it was made (``spawner``: the hub's spawner and its version; ``setting``: this
    platform's setting that makes the variant), the table, the plot."""
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    image_name = PLOT.format(variant=variant.name)
    plot(runs, args.sizes, out_dir / image_name, variant)
    table = report(runs, args.sizes, args, variant)
    print("\n".join(table))
    import jupyterhub

    chp = subprocess.run([str(CHP), "--version"], capture_output=True, text=True).stdout.strip()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    command = "python -m bench peer " + " ".join(argv if argv is not None else sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    section = [
        *heading,
        f"Made by `{command.strip()}` on {when} in {time.time() - started:.0f} s, "
        f"{os.cpu_count()} cores shared with other work (load average "
        f"{' '.join(load_before)} at the start, "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end); JupyterHub "
        f"{jupyterhub.__version__}, {spawner}, configurable-http-proxy {chp} on Node {node}; "
        f"this platform with {setting}.",
        "",
        *table,
        "",
        f"![JupyterHub against this platform, {setting}]({image_name})",
        "",
    ]
    write_doc(section, args.out, variant.name)
    print(f"wrote {args.out} and {out_dir / image_name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50, 200])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.5, help="poll interval (s)")
    parser.add_argument(
        "--backend",
        choices=("docker", "process"),
        default="docker",
        help="this platform's backend: docker (against DockerSpawner, the default) or process "
        "(against LocalProcessSpawner; bench.peer_process says how)",
    )
    parser.add_argument(
        "--network",
        choices=("veth", "workspace", "host"),
        default="veth",
        help="docker: this platform's DOCKER_NETWORK_MODE (default: its own default)",
    )
    parser.add_argument(
        "--hub-server",
        choices=("python", "busybox"),
        default="python",
        help="process: what each hub server runs (python: the same interpreter and page server "
        "as the platform's agent, the default; busybox: httpd and wget, as the docker variant)",
    )
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if (
        importlib.util.find_spec("jupyterhub") is None
        or importlib.util.find_spec("matplotlib") is None
    ):
        raise SystemExit(
            "the peer bench needs its optional dependency group: uv sync --group peer"
            " (bin/test syncs the default groups only, which drops it)"
        )
    if args.backend == "process":
        from bench.peer_process import run_process

        return run_process(args, argv)

    from bench.engine import ensure_agent_image, ensure_engine

    ensure_engine()
    os.environ["DOCKER_NETWORK_MODE"] = args.network
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    started = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    print(f"# logs in {log_dir}", file=sys.stderr, flush=True)
    # The platform's own Redis, so that its CPU is counted with the platform's.
    with private_redis(log_dir) as redis_pid:
        setup_django("ws_peer_bench", redis_db=9)
        from django.conf import settings
        from django.db import connection

        database = str(connection.settings_dict["NAME"])
        image = ensure_agent_image()
        with (
            platform("peer", log_dir, proxy=True) as stack,
            DockerHub(image, str(settings.DOCKER_WORKSPACE_USER), log_dir) as hub,
        ):
            stack.redis_pid = redis_pid
            runs = alternate(
                args,
                lambda n: here_round(stack, database, n, args.interval),
                lambda: here_clean(stack),
                hub,
            )
    import dockerspawner

    if args.network == "veth":
        heading = ["## peer: JupyterHub", "", (__doc__ or "").strip(), ""]
    else:
        heading = [f"### peer, this platform with DOCKER_NETWORK_MODE={args.network}", ""]
    write_results(
        runs,
        args,
        argv,
        docker_variant(args.network),
        heading,
        started,
        load_before,
        f"DockerSpawner {dockerspawner.__version__}",
        f"DOCKER_NETWORK_MODE={args.network}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
