"""The hub's side of the peer comparison: JupyterHub (its own sqlite database, the hub's default)
with configurable-http-proxy (from npm, installed into ``var/peer/node_modules``) as child
processes of the bench, and its round: ``POST /hub/api/users/<name>/server`` for N users created
before the round (answered 202 at once), polled with ``GET /hub/api/users?state=ready`` until all
N are ready. A server is ready when the proxy's ``add_user`` returns (recorded by a one-line
subclass in the hub's config; the hub marks the server ready right after). A subclass of ``Hub``
says what the spawner is (``bench.peer.docker``, ``bench.peer.process``)."""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import call_json
from bench.peer.rounds import TIMEOUT, Run, requests_and_watch
from bench.stack import REPO, free_port, stop, wait_until

PEER_DIR = REPO / "var" / "peer"
CHP = PEER_DIR / "node_modules" / ".bin" / "configurable-http-proxy"
CHP_VERSION = "4"
RESENDS = 3  # times a hub request whose connection was reset is sent again
CLEAN_TIMEOUT = 180.0

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
        return call_json(self.port, method, f"/hub/api{path}", self.headers, body)

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
            stop(self.proc, timeout=60)
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

    sent = requests_and_watch(n, spawn, count, failed, interval, f"hub N={n}")
    after = hub.cpu()
    ready = hub.ready_times()
    latencies = [ready[name] - sent[name] for name in sent]
    cpu = {part: after[part] - before[part] for part in after}
    total = max(ready[name] for name in sent) - min(sent.values())
    return Run(total, latencies, cpu, resent=len(resent))
