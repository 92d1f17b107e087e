"""What gVisor costs a Docker workspace: the same workspaces under ``sandbox: gvisor`` beside
``sandbox: runc`` (the floor), on the same engine in the same run, the two alternating.

The platform's own start cycle runs in this process (``lifecycle.converge`` on the Docker backend,
``DOCKER_NETWORK_MODE=veth``, the default: a link per workspace), with the default template's
agent and app (busybox, a heartbeat a second), calling back a tiny HTTP server that answers 200
to everything (``bench.stack.BareEndpoint``), so both sides do exactly the same work:

* **start**: the cycle's beginning to the agent's first ``/register`` call arriving (gate, rows,
  token, container, link, the sandbox's boot, the agent's app answering, the HTTP call), one
  workspace at a time;
* **CPU to come up**, per workspace: every process of the workspace (those in its container's
  cgroup, and those naming its container: the shim, and under gVisor the sandbox's kernel, the
  sentry, and its file proxy, the gofer) plus the engine's own (dockerd, containerd: every
  process under the private engine's root), from before the create to the last registration;
* **memory at rest**, per workspace: the proportional set size (``Pss`` of
  ``/proc/<pid>/smaps_rollup``: shared pages split between their users) of the workspace's
  processes as above, once all of them are up; the engine's own daemons are left out;
* **CPU at rest**, per workspace: the same processes over a quiet window with every workspace
  up, heartbeating each second.

The sentry holds the sandbox's memory for the workspace's processes (a file it maps), so its Pss
is what the workspace's processes cost under gVisor; under runc they are counted themselves.
CPU figures need the private engine (``bench.engine.ensure_engine`` without DOCKER_HOST) to find
the engine's processes; with another engine the engine's share is left out and said so.

Run: ``.venv/bin/python -m bench --only sandbox`` (as root: veth links; runsc installed).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Figure, print_figures, setup_django
from bench.engine import processes

WORKSPACES = 4  # at once, per sandbox and repeat
REST_SECONDS = 10.0
TEMPLATE = (
    "runtime: shell\nimage: workspace-agent:dev\nsandbox: {sandbox}\n"
    "env:\n  AGENT_HEARTBEAT_SECONDS: '1'\n"
    "app:\n  port: auto\n  health_path: /\n"
)


def _pids_of(container_ids: list[str]) -> set[int]:
    """The processes of these containers: in their cgroups, or naming them (shims, gofers)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(cid in cgroup or cid in command for cid in container_ids):
            found.add(int(entry.name))
    return found


def _engine_pids() -> set[int]:
    root = os.environ.get("BENCH_DOCKERD_ROOT", "")
    if not root:
        return set()
    return {pid for pid, proc in processes().items() if root in proc.command}


def _cpu(pids: set[int]) -> float:
    snapshot = processes()
    return sum(snapshot[pid].cpu for pid in pids if pid in snapshot)


def _pss_mib(pids: set[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def run(repeats: int) -> list[Figure]:
    from bench.engine import ensure_agent_image, ensure_engine
    from bench.stack import BareEndpoint

    ensure_engine()
    setup_django(database=os.environ.get("BENCH_DATABASE", "ws_sandbox_bench"), redis_db=5)
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from provisioning import lifecycle
    from provisioning.backends import backend_for, reset_backends
    from provisioning.backends.engine import make_client
    from workspaces import services
    from workspaces.manifests import invalidate_templates
    from workspaces.models import Workspace

    ensure_agent_image()
    client = make_client()
    if settings.DOCKER_GVISOR_RUNTIME not in (client.info().get("Runtimes") or {}):
        raise RuntimeError(f"the engine has no {settings.DOCKER_GVISOR_RUNTIME} runtime")
    folder = Path(os.environ.get("BENCH_OUT_DIR", "/tmp")) / f"sandbox-templates-{os.getpid()}"
    for sandbox in ("runc", "gvisor"):
        (folder / f"bench-{sandbox}").mkdir(parents=True, exist_ok=True)
        (folder / f"bench-{sandbox}" / "config.yaml").write_text(TEMPLATE.format(sandbox=sandbox))
    settings.WORKSPACE_TEMPLATES_DIR = folder
    settings.WORKSPACE_BACKEND = "docker"
    settings.DOCKER_NETWORK_MODE = "veth"
    invalidate_templates()
    reset_backends()
    user, _ = get_user_model().objects.get_or_create(username="bench-sandbox")
    engine_known = bool(os.environ.get("BENCH_DOCKERD_ROOT"))
    samples: dict[str, dict[str, list[float]]] = {
        sandbox: {"start": [], "cpu_up": [], "pss": [], "cpu_rest": []}
        for sandbox in ("runc", "gvisor")
    }

    with BareEndpoint(host="0.0.0.0") as endpoint:
        settings.PLATFORM_URL = endpoint.url

        def one_run(sandbox: str) -> None:
            made: list[Any] = []
            engine = _engine_pids()
            cpu_before = _cpu(engine)
            for _ in range(WORKSPACES):
                workspace = services.create_workspace(
                    owner=user, name=f"s-{uuid.uuid4().hex[:10]}", template=f"bench-{sandbox}"
                )
                made.append(workspace)
                began = time.time()
                lifecycle.converge(workspace.id)
                deadline = time.monotonic() + 60
                while endpoint.arrived(str(workspace.id)) is None:
                    if time.monotonic() > deadline:
                        row = Workspace.objects.get(id=workspace.id)
                        raise RuntimeError(
                            f"{sandbox} workspace never registered: {row.last_error}"
                        )
                    time.sleep(0.005)
                arrived = endpoint.arrived(str(workspace.id)) or began
                samples[sandbox]["start"].append(arrived - began)
            rows = Workspace.objects.filter(id__in=[w.id for w in made])
            containers = [row.backend_state["container_id"] for row in rows]
            mine = _pids_of(containers)
            up = _cpu(mine | engine | _engine_pids()) - cpu_before
            samples[sandbox]["cpu_up"].append(up * 1000 / WORKSPACES)
            time.sleep(2)  # past the agents' first heartbeat
            mine = _pids_of(containers)
            samples[sandbox]["pss"].append(_pss_mib(mine) / WORKSPACES)
            everything = mine | _engine_pids()
            rest_before = _cpu(everything)
            time.sleep(REST_SECONDS)
            rest = _cpu(everything | _pids_of(containers)) - rest_before
            samples[sandbox]["cpu_rest"].append(rest * 1000 / REST_SECONDS / WORKSPACES)
            for row in rows:
                backend_for(row).remove(row.id, row.backend_state)
            rows.delete()

        for sandbox in ("runc", "gvisor"):  # config images built, first starts paid: untimed
            one_run(sandbox)
            for values in samples[sandbox].values():
                values.clear()
        for repeat in range(repeats):
            order = ("runc", "gvisor") if repeat % 2 == 0 else ("gvisor", "runc")
            for sandbox in order:
                one_run(sandbox)
    client.close()

    engine_note = (
        "" if engine_known else " (not the engine's daemons: the run's engine is not its own)"
    )
    figures = [
        Figure(
            "gvisor workspace start (cycle begins -> agent's first call)",
            "s",
            samples["gvisor"]["start"],
            floor_name="runc workspace start",
            floor_samples=samples["runc"]["start"],
            extra={
                "headline": "gVisor: start "
                f"{_ratio(samples, 'start'):.2f}x runc's, memory at rest "
                f"{_ratio(samples, 'pss'):.2f}x, CPU at rest {_ratio(samples, 'cpu_rest'):.2f}x "
                "per workspace"
            },
        ),
        Figure(
            f"gvisor CPU to come up per workspace (its processes, sentry and gofer, and the "
            f"engine{engine_note})",
            "ms",
            samples["gvisor"]["cpu_up"],
            floor_name="runc CPU to come up per workspace",
            floor_samples=samples["runc"]["cpu_up"],
        ),
        Figure(
            "gvisor memory per workspace at rest (Pss: its processes, sentry, gofer, shim)",
            "MiB",
            samples["gvisor"]["pss"],
            floor_name="runc memory per workspace (Pss: its processes, shim)",
            floor_samples=samples["runc"]["pss"],
        ),
        Figure(
            "gvisor CPU at rest per workspace (1 s heartbeats)",
            "ms/s",
            samples["gvisor"]["cpu_rest"],
            floor_name="runc CPU at rest per workspace",
            floor_samples=samples["runc"]["cpu_rest"],
        ),
    ]
    return figures


def _ratio(samples: dict[str, dict[str, list[float]]], key: str) -> float:
    import statistics

    floor = statistics.median(samples["runc"][key])
    return statistics.median(samples["gvisor"][key]) / floor if floor else float("nan")


if __name__ == "__main__":
    print_figures(run(int(os.environ.get("BENCH_REPEATS", "3"))))
