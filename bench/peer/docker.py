"""The peer on Docker: JupyterHub with DockerSpawner against this platform's Docker backend, on
the same private engine, in one run (``python -m bench peer``, the default backend).

* **hub**: DockerSpawner with 4 engine threads (its default is one shared thread; 4 matches the
  Celery worker's 4 processes here). Each server is the platform's agent image (the same
  FROM-scratch busybox image) with a command that starts busybox ``httpd`` on the port the
  spawner picked and posts its activity to the hub's API once (as jupyterhub-singleuser does
  when it starts). The hub waits until the server answers HTTP, then adds its route to the
  proxy: that is "ready".
* **here**: the Docker backend, template ``shell-default`` (the agent starts busybox ``httpd`` on
  the app port and registers once it answers; the proxy serves a workspace as soon as its row
  says it is up, with no route of its own to write): "online".

CPU per workspace, besides the control planes: the engine (dockerd, containerd, shims).

Containers on both sides run as uid 10001 with every capability dropped, ``no-new-privileges``,
512 MiB, 1 CPU and 256 pids. What differs, by design of each product: the hub's servers use the
host's network; each workspace here gets a network link of its own (``DOCKER_NETWORK_MODE=veth``,
the default: the container starts with networking disabled and the worker wires a veth pair into
it; ``--network workspace``: an internal bridge network made through the engine, created and
removed with it; ``--network host``: the host's network, the backend's documented opt-out), a
config volume the engine fills from the template's config image as it creates the
container, a per-workspace token, rows and events in PostgreSQL and a gate in Redis, and a
heartbeat every 10 s (``AGENT_HEARTBEAT_SECONDS``).

Uses the engine in ``DOCKER_HOST`` (``BENCH_DOCKERD_ROOT``: the engine's folder, to find its
processes) or a private dockerd. Writes its block of docs/benchmarks.md (one per ``--network``)
and the plot ``docs/peer-<network>.png``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.engine import cpu_seconds, ensure_agent_image, ensure_engine
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
from bench.stack import remove_labelled

HUB_THREADS = 4
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


def run(args: Any, argv: list[str] | None, intro: str) -> int:
    """``python -m bench peer [--network ...]``: see this module's docstring."""
    ensure_engine()
    os.environ["DOCKER_NETWORK_MODE"] = args.network
    pool = max(args.sizes) if args.pool else 0
    if pool:
        with_pool(pool)
    start = Start.now()
    with own_redis(start.log_dir) as redis_pid:
        from django.conf import settings

        image = ensure_agent_image()
        remove_pool_members("docker")  # what an earlier run with --pool left
        try:
            with (
                here_platform(start.log_dir, "docker", redis_pid) as stack,
                DockerHub(image, str(settings.DOCKER_WORKSPACE_USER), start.log_dir) as hub,
            ):
                runs = alternate(
                    args,
                    (
                        lambda n: here_round(stack, n, args.interval, pool=pool),
                        lambda: here_clean(stack, "docker"),
                    ),
                    (lambda n: hub_round(hub, n, args.interval), hub.clean),
                )
        finally:
            remove_pool_members("docker")
    import dockerspawner

    if pool:
        heading = [f"### peer on Docker, here from a warm pool of {pool}", "", POOLED, ""]
    elif args.network == "veth":
        heading = ["## peer: JupyterHub", "", intro, "", (__doc__ or "").strip(), ""]
    else:
        heading = [f"### peer, this platform with DOCKER_NETWORK_MODE={args.network}", ""]
    variant = Variant(
        name=f"{args.network}_pool" if pool else args.network,
        own="engine",
        own_column="engine CPU/ws",
        own_title="engine: dockerd+containerd+shims",
        phases=PHASES,
        here_label="this platform (Docker backend)",
        hub_label="JupyterHub + DockerSpawner",
        spawner=f"DockerSpawner {dockerspawner.__version__} ({HUB_THREADS} engine threads)",
        setting=f"DOCKER_NETWORK_MODE={args.network}"
        + (f", a warm pool of {pool}" if pool else ""),
    )
    write_results(runs, args, argv, variant, heading, start)
    return 0
