"""The peer without containers: JupyterHub with its LocalProcessSpawner against this platform's
process backend, on the same machine, in one run (``python -m bench peer --backend process``).

Rounds, requests, polling, latencies and the report work as in the Docker comparison
(``bench.peer``): N requests at once through each side's REST API, until all N are ready (hub)
or ``online`` (here), rounds alternating, everything removed between rounds, untimed.

* **hub**: JupyterHub (sqlite) with configurable-http-proxy and a small subclass of
  LocalProcessSpawner. LocalProcessSpawner runs each user's server as that user's system account
  (``pwd.getpwnam``); rather than creating one account per hub user, the subclass's
  ``make_preexec_fn`` drops every server to one unprivileged uid (10001, no supplementary groups)
  in a home of its own (a 0700 folder it creates, as root, just before the drop) and its
  ``user_env`` sets ``HOME``, ``USER`` and ``SHELL`` to match. Each server is a small page server
  on the same Python (``WORKSPACE_PYTHON``): the standard library's threading HTTP server on the
  port the spawner picked, and one activity post to the hub's API with ``urllib`` (as
  jupyterhub-singleuser does when it starts). The agent here answers its page and makes its calls
  on plain sockets, which costs its interpreter less than these modules; ``--hub-server busybox``
  runs busybox ``httpd`` and ``wget`` instead, as the Docker comparison's servers do: the lower
  floor for the "workspace processes" column.
* **here**: the same processes as the Docker comparison (the Procfile's) with
  ``WORKSPACE_BACKEND=process``, template ``shell-default``: the agent
  (``provisioning/agent/workspace_agent.py`` on ``WORKSPACE_PYTHON``) serves its default page on
  the app port, registers once the page answers, then heartbeats every 10 s.

CPU per workspace, read from ``/proc`` around the round: the workspaces' own processes (here:
every process of a uid of ``WORKSPACE_UID_RANGE`` and its monitor, the root process that
launched it, waits for it and records its exit; on the hub: every process carrying the run's
marker in its environment, i.e. the servers and what they started), the control plane (hub +
configurable-http-proxy minus its servers; the Procfile's processes, with the launcher processes
the worker runs and reaps) and here the PostgreSQL backends of the bench's
database and the platform's own Redis.

What differs, by design of each product: each workspace here runs as its own uid from
``WORKSPACE_UID_RANGE`` (the hub's servers share one), in namespaces of its own: a network
namespace whose one way out is a veth link to the host, over which it reaches the registry port
and nothing else of the host and the proxy reaches its app (the host side of the links is one
nftables table of the platform's, nothing per workspace), and a private mount namespace with its
own empty ``/run``, ``/tmp`` and ``/dev/shm``, with ``no_new_privs``; it gets its own config and
home folders, a per-workspace token, rows and events in PostgreSQL and a gate in Redis, and a
heartbeat every 10 s. The hub's servers run unconfined as uid 10001, reach every port on the
host, and post their activity once.

The bench gives the platform a data folder of its own and, unless set in the environment, its
own ``WORKSPACE_UID_RANGE`` (210000-210999), ``WORKSPACE_FIREWALL_CHAIN`` (``WS-BENCH-PEER``, the
table's name, removed at the end), ``WORKSPACE_APP_PORTS`` (16000-16999), ``PROCESS_LINK_PREFIX``
(``wsbp``) and ``PROCESS_LINK_SUBNET`` (``10.212.0.0/16``), so that it shares no uid, table, port
or link with another platform on the host. Runs as root (the process backend's uid
isolation needs it); needs nftables (libnftables) and Caddy. Writes its block of
docs/benchmarks.md and the plot
``docs/peer-process.png`` (``--hub-server busybox``: ``process_busybox``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from bench.engine import descendants, processes
from bench.peer.here import (
    here_clean,
    here_platform,
    here_round,
    own_redis,
    remove_pool_members,
    with_pool,
)
from bench.peer.hub import Hub, hub_round
from bench.peer.report import POOLED, Start, Variant, write_results
from bench.peer.rounds import alternate

HUB_UID = 10001
# The platform's settings this bench gives its own values unless the environment sets them.
OWN_SETTINGS = {
    "WORKSPACE_UID_RANGE": "210000-210999",
    "WORKSPACE_FIREWALL_CHAIN": "WS-BENCH-PEER",
    "WORKSPACE_APP_PORTS": "16000-16999",
    "PROCESS_LINK_PREFIX": "wsbp",
    "PROCESS_LINK_SUBNET": "10.212.0.0/16",
}
PHASES = {
    "queue": "POST sent -> cycle began",
    "cycle": "cycle began -> process running (folders, config, namespaces and link, launch)",
    "agent": "process running -> registered (interpreter start, app answers, register call)",
}

# The hub's server: the standard library's threading HTTP server on the port (argv[1]), then one
# activity post to the hub with urllib; SIGINT (the hub's stop) ends it at once.
SERVER_PYTHON = r"""
import json, os, signal, sys, threading, urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = b"<!doctype html><title>server</title><p>A server of the hub.</p>\n"


class Page(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Page)
threading.Thread(target=server.serve_forever, daemon=True).start()
now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
body = {"last_activity": now, "servers": {"": {"last_activity": now}}}
request = urllib.request.Request(
    f"{os.environ['JUPYTERHUB_API_URL']}/users/{os.environ['JUPYTERHUB_USER']}/activity",
    data=json.dumps(body).encode(),
    headers={
        "Authorization": f"token {os.environ['JUPYTERHUB_API_TOKEN']}",
        "Content-Type": "application/json",
    },
    method="POST",
)
try:
    urllib.request.urlopen(request, timeout=60).close()
except OSError as exc:
    print(f"activity post failed: {exc}", flush=True)
try:
    signal.pause()
except KeyboardInterrupt:
    pass
"""

# The Docker comparison's server on the host: busybox httpd serving the home folder on the port
# ($1), one activity post with busybox wget, and a trap that ends both on the hub's stop.
SERVER_BUSYBOX = r"""
trap 'kill $httpd 2>/dev/null; exit 0' TERM INT
/bin/busybox httpd -f -p 127.0.0.1:$1 -h "$HOME" & httpd=$!
now=$(/bin/busybox date -u +%Y-%m-%dT%H:%M:%S.000000Z)
at="{\"last_activity\": \"$now\"}"
/bin/busybox wget -q -O /dev/null \
  --header "Authorization: token $JUPYTERHUB_API_TOKEN" \
  --header "Content-Type: application/json" \
  --post-data "{\"last_activity\": \"$now\", \"servers\": {\"\": $at}}" \
  "$JUPYTERHUB_API_URL/users/$JUPYTERHUB_USER/activity" || echo "activity post failed"
wait $httpd
"""

PROCESS_SPAWNER_CONFIG = '''
import os

from jupyterhub.spawner import LocalProcessSpawner

UID = {uid}
HOMES = {homes!r}


class PeerSpawner(LocalProcessSpawner):
    """Every server runs as one unprivileged uid instead of its user's system account (none
    exists), in a home of its own; a free port per server, passed as the command's argument."""

    async def start(self):
        self.port = random_port()
        return await super().start()

    def get_args(self):
        return [str(self.port)]

    def _home(self):
        return os.path.join(HOMES, self.user.name)

    def make_preexec_fn(self, name):
        home = self._home()

        def preexec():
            # After the fork, before the exec, still root: the home, then the uid for good.
            os.makedirs(home, mode=0o700, exist_ok=True)
            os.chown(home, UID, UID)
            os.setgroups([])
            os.setgid(UID)
            os.setuid(UID)
            os.chdir(home)

        return preexec

    def user_env(self, env):
        env.update(USER=self.user.name, HOME=self._home(), SHELL="/bin/sh")
        return env


c.JupyterHub.spawner_class = PeerSpawner
c.Spawner.cmd = {cmd!r}
# Marks every process of this run's servers (the bench finds them by it).
c.Spawner.environment = {{"BENCH_PEER_RUN": {run_id!r}}}
# The servers leave at once on SIGINT; the default waits are 30 s.
c.LocalProcessSpawner.interrupt_timeout = 10
c.LocalProcessSpawner.term_timeout = 10
'''


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _marked(marker: bytes) -> list[int]:
    """The processes whose environment holds ``marker`` (``NAME=value``)."""
    found = []
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(pid)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class ProcessHub(Hub):
    """The hub with LocalProcessSpawner; every process of its servers carries the run's marker
    (``BENCH_PEER_RUN``) in its environment."""

    def __init__(self, log_dir: Path, python: str, server: str, uid: int = HUB_UID) -> None:
        self.uid = uid
        self.homes = Path(tempfile.mkdtemp(prefix="bench-peer-homes-"))
        self.homes.chmod(0o711)  # the uid enters its own home only
        if server == "busybox":
            self.cmd = ["/bin/busybox", "sh", "-c", SERVER_BUSYBOX, "server"]
        else:
            self.cmd = [python, "-c", SERVER_PYTHON]
        super().__init__(log_dir)

    @property
    def marker(self) -> bytes:
        return f"BENCH_PEER_RUN={self.run_id}".encode()

    def spawner_config(self) -> str:
        return PROCESS_SPAWNER_CONFIG.format(
            uid=self.uid, homes=str(self.homes), cmd=self.cmd, run_id=self.run_id
        )

    def servers(self) -> list[int]:
        return _marked(self.marker)

    def remove_leftovers(self) -> None:
        _kill(self.servers())

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            shutil.rmtree(self.homes, ignore_errors=True)

    def cpu(self) -> dict[str, float]:
        assert self.proc is not None
        snapshot = processes()
        servers = set(self.servers())
        tree = descendants(snapshot, [self.proc.pid])
        return {
            "workspace": sum(snapshot[pid].cpu for pid in servers if pid in snapshot),
            "control": sum(snapshot[pid].cpu for pid in tree - servers),
        }


def workspace_processes(uids: tuple[int, int]) -> dict[int, float]:
    """pid -> CPU seconds of every process of a workspace uid and of its monitor (the root
    process that launched the workspace's process and waits for it, not the platform's)."""
    low, high = uids
    snapshot = processes()
    found: dict[int, float] = {}
    for pid, proc in snapshot.items():
        if not low <= proc.uid <= high:
            continue
        found[pid] = proc.cpu
        parent = snapshot.get(proc.parent)
        if proc.parent > 1 and parent is not None and not low <= parent.uid <= high:
            found[proc.parent] = parent.cpu
    return found


def run(args: Any, argv: list[str] | None, intro: str) -> int:
    """``python -m bench peer --backend process``: see this module's docstring."""
    if os.geteuid() != 0:
        raise SystemExit("the process backend's uid isolation needs root: run the bench as root")
    for name, value in OWN_SETTINGS.items():
        os.environ.setdefault(name, value)
    data = Path(tempfile.mkdtemp(prefix="bench-peer-data-"))
    data.chmod(0o711)  # workspace uids traverse it to their own folders
    os.environ["WORKSPACE_BACKEND"] = "process"
    os.environ["WORKSPACE_DATA_DIR"] = str(data)
    pool = max(args.sizes) if args.pool else 0
    if pool:
        with_pool(pool)
    start = Start.now()
    with own_redis(start.log_dir) as redis_pid:
        from django.conf import settings

        uids = (int(settings.WORKSPACE_UID_RANGE[0]), int(settings.WORKSPACE_UID_RANGE[1]))
        if max(args.sizes) + pool > uids[1] - uids[0] + 1:
            raise SystemExit(
                f"N = {max(args.sizes)} and a pool of {pool} need as many uids: widen "
                "WORKSPACE_UID_RANGE"
            )
        python = str(settings.WORKSPACE_PYTHON)
        remove_pool_members("process")  # what an earlier run with --pool left
        try:
            with (
                here_platform(start.log_dir, "process", redis_pid) as stack,
                ProcessHub(start.log_dir, python, args.hub_server) as hub,
            ):
                own = partial(workspace_processes, uids)
                runs = alternate(
                    args,
                    (
                        lambda n: here_round(stack, n, args.interval, workspaces=own, pool=pool),
                        lambda: here_clean(stack, "process"),
                    ),
                    (lambda n: hub_round(hub, n, args.interval), hub.clean),
                )
        finally:
            remove_pool_members("process")
            _kill([pid for pid, proc in processes().items() if uids[0] <= proc.uid <= uids[1]])
            if OWN_SETTINGS["WORKSPACE_FIREWALL_CHAIN"] == settings.WORKSPACE_FIREWALL_CHAIN:
                from provisioning.backends.process_firewall import remove_workspace_firewall

                remove_workspace_firewall(str(settings.WORKSPACE_FIREWALL_CHAIN))
            shutil.rmtree(data, ignore_errors=True)
    name = "process" if args.hub_server == "python" else f"process_{args.hub_server}"
    variant = Variant(
        name=f"{name}_pool" if pool else name,
        own="workspace",
        own_column="workspace processes CPU/ws",
        own_title="the workspaces' own processes",
        phases=PHASES,
        here_label="this platform (process backend)",
        hub_label="JupyterHub + LocalProcessSpawner",
        spawner=f"LocalProcessSpawner (servers: {args.hub_server}, uid {HUB_UID})",
        setting="WORKSPACE_BACKEND=process" + (f", a warm pool of {pool}" if pool else ""),
    )
    if pool:
        heading = [f"### peer on local processes, here from a warm pool of {pool}", "", POOLED, ""]
    else:
        heading = [
            "## peer: JupyterHub on local processes"
            if args.hub_server == "python"
            else f"### peer on local processes, hub servers running {args.hub_server}",
            "",
            *([intro, "", (__doc__ or "").strip(), ""] if args.hub_server == "python" else []),
        ]
    write_results(runs, args, argv, variant, heading, start)
    return 0
