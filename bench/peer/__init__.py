"""The peer: JupyterHub against this platform, on the same machine, in one run.

Both sides run as their users run them, each started by this bench as child processes:

* **hub**: JupyterHub (its own sqlite database, the hub's default) with configurable-http-proxy
  and a spawner (``bench.peer.docker``: DockerSpawner, the default; ``bench.peer.process``:
  LocalProcessSpawner, ``--backend process``).
* **here**: the Procfile's processes, each line run as ``bin/run`` runs it (``/bin/sh -c 'exec
  <line>'``, ``bench.stack.procfile_commands``): gunicorn with 2 uvicorn workers (the API),
  the registry listener (1 worker), one Celery worker (prefork, concurrency 4, the lifecycle and
  sweep queues), Celery beat and Caddy as the proxy, with the settings' log level (INFO),
  gunicorn's access logs, the worker's gossip, mingle and heartbeat, and the metrics in
  ``PROMETHEUS_MULTIPROC_DIR`` as ``bin/run`` sets them. Only the ports, the Redis (one of the
  platform's own), ``RUN_DIR`` (the run's folder) and the admission limits (no quota refuses a
  batch) are the bench's.

Why the Procfile's lines: the bench once started these processes with lines of its own, which
an independent run from the Procfile found flattering (at N = 50 on Docker its control plane
cost half as much CPU per workspace): no Celery beat (so no sweeps, which list the engine's
containers and read PostgreSQL and Redis during a round), warnings-only logs and no access
logs, a worker without gossip, mingle and heartbeat, and in-process metrics. The bench now
reports what a user who runs ``bin/run`` pays. The hub is the other way: it logs warnings only
(its default is INFO) and gets the same concurrency as the platform's worker (4 spawner
threads on Docker, where its default is one), so where the two could differ the comparison
errs against this platform. One untimed round of one on each side warms imports and
connections (it warms one of the worker's 4 processes: the others warm in the first rounds).

A round sends N requests at once through each side's REST API (``POST /hub/api/users/<name>/
server`` for N users created before the round, answered 202 at once like the platform's 201;
``POST /api/workspaces/``) and polls each side's REST API every 0.5 s (``GET /hub/api/users?
state=ready``, ``GET /api/workspaces/?status=online``) until all N are up. Per server, latency is
its request being sent to the moment each side records it up: here the ``WORKSPACE_ONLINE`` event
(the agent's registration, after which the proxy serves it), on the hub the return of the
proxy's ``add_user`` (the hub marks the server ready right after). The round's total is the
first request to the last one up. CPU per workspace is read from ``/proc`` around the round
(before cleanup): the workspaces' own side (the engine, or the workspaces' processes), the
control plane (hub + configurable-http-proxy; every Procfile process and its children) and,
here, the PostgreSQL backends serving the bench's database and the platform's Redis. The hub
keeps its state in sqlite inside its own process, so the comparison is here's control plane +
PostgreSQL + Redis against the hub's control plane. Rounds alternate (which side goes first
flips every round) and everything is removed between rounds, untimed.

Not in CI and not a default dependency group::

    uv sync --group peer          # jupyterhub, dockerspawner, matplotlib
    python -m bench peer [--sizes 1 10 50 200] [--rounds 3] [--network veth|workspace|host]
    python -m bench peer --backend process [--sizes 1 10 50 200 500]
    python -m bench peer [--backend process] --sizes 1 10 50 --pool   # here from a warm pool

Uses ``DATABASE_URL`` (default ``ws_peer_bench``); the platform's Redis is a redis-server the
bench starts for it alone. Writes its block of docs/benchmarks.md (between markers that
``python -m bench`` keeps) and a plot beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from bench.peer import docker, process
from bench.peer.report import DOC, MARKERS

__all__ = ["MARKERS", "main"]


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
        "(against LocalProcessSpawner; bench.peer.process says how)",
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
    parser.add_argument(
        "--pool",
        action="store_true",
        help="serve every request here from a warm pool of the template, sized to the largest "
        "N (the report's own block; bench.peer.report.POOLED says what is counted)",
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
    intro = (__doc__ or "").strip()
    backend = process if args.backend == "process" else docker
    return backend.run(args, argv, intro)
