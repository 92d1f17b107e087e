"""What a process workspace's own namespaces cost, against the launch they replace, in one run.

Both sides launch the same sleeper through the process backend's monitor as a workspace uid,
alternating start by start:

- **namespaced** (what the backend does now): ``unshare --mount --net``, an empty tmpfs over each
  of ``WORKSPACE_PRIVATE_PATHS`` with the workspace's folder bound back, the veth link wired while
  the monitor waits;
- **shared network** (what it did before): ``unshare --mount``, ``WORKSPACE_HIDDEN_PATHS``
  covered, and the per-uid nftables rule that opened the workspace's own app port to it (the
  same one-transaction write, into a table of the bench's own).

Per start: the wall time of the launch until the monitor reports the instance. At rest: the
kernel's memory (``Slab`` + ``KernelStack`` + ``PageTables`` + ``Percpu`` of /proc/meminfo) with
``resting`` instances of one side running, minus before, per instance (the instances' own
memory is the same program on both sides); other work on the host moves these totals too, so it
is an estimate, the more instances the better. Needs root. No database: it drives the launch
directly.

    .venv/bin/python -m bench --only process_namespace --repeats 3 --out /tmp/ns.md
    .venv/bin/python -m bench.process_namespace [repeats] [starts per round] [resting]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import Figure, print_figures

KERNEL_FIELDS = ("Slab", "KernelStack", "PageTables", "Percpu")


def _kernel_kb() -> int:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return sum(fields[name] for name in KERNEL_FIELDS if name in fields)


def run(repeats: int = 3, instances: int = 5, resting: int = 25) -> list[Figure]:
    # Only the settings: the launch reads no database.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.conf import settings

    from provisioning.backends import nft, process_launch, process_network
    from provisioning.backends.process_firewall import ensure_workspace_firewall

    ensure_workspace_firewall()
    # The floor's table: named after the platform's, so benches of two platforms never meet.
    table = f"{settings.WORKSPACE_FIREWALL_CHAIN}_nsbench"
    nft.run(f"add table inet {table}\nadd map inet {table} uids {{ type uid : verdict ; }}")
    root = Path(tempfile.mkdtemp(prefix="bench-ns-"))
    root.chmod(0o711)
    # The range's end, which the platform hands out last: unlikely to be in use.
    low = settings.WORKSPACE_UID_RANGE[1] - 2 * max(instances, resting)
    slots = max(instances, resting)
    python = sys.executable

    def launch(namespaced: bool, index: int) -> tuple[float, int, str]:
        uid = low + (index if namespaced else slots + index)
        workspace_id = str(uuid.uuid4())
        folder = root / workspace_id
        folder.mkdir()
        os.chown(folder, uid, uid)
        started = time.perf_counter()
        mounts = process_launch.MountPlan.make(
            settings.WORKSPACE_PRIVATE_PATHS if namespaced else [],
            [str(folder)],
            settings.WORKSPACE_HIDDEN_PATHS,
        )
        pair = process_network.link(uid)
        if not namespaced:
            chain = f"u{uid}"
            nft.run(
                f"add chain inet {table} {chain}\nflush chain inet {table} {chain}\n"
                f"add rule inet {table} {chain} tcp dport 20000 accept\n"
                f"add element inet {table} uids {{ {uid} : jump {chain} }}"
            )
        orders = process_launch.orders(
            uid=uid,
            generation=1,
            log=str(folder / "out.log"),
            instance_file=str(folder / "instance.json"),
            exit_file=str(folder / "exit.json"),
            cwd=str(folder),
            mounts=mounts,
            link_wait=process_launch.LINK_WAIT_SECONDS if namespaced else None,
            argv=[settings.WORKSPACE_PYTHON, "-c", "import time; time.sleep(600)"],
            env={"PATH": "/usr/bin:/bin"},
        )
        process_launch.launch(
            process_launch.command(True, python, network=namespaced),
            orders,
            wire=(lambda pid: process_network.wire(pid, process_network.link_name(uid), pair))
            if namespaced
            else None,
            timeout=30,
        )
        return time.perf_counter() - started, uid, workspace_id

    def stop(uid: int, workspace_id: str) -> None:
        process_launch.kill_uid(uid)
        process_network.unwire(process_network.link_name(uid))

    def rest(namespaced: bool) -> float:
        before = _kernel_kb()
        running = [launch(namespaced, index) for index in range(resting)]
        time.sleep(1.0)
        during = _kernel_kb()
        for _, uid, workspace_id in running:
            stop(uid, workspace_id)
        time.sleep(1.0)  # the kernel tears namespaces down a moment later
        return (during - before) / resting

    namespaced_ms: list[float] = []
    shared_ms: list[float] = []
    namespaced_kb: list[float] = []
    shared_kb: list[float] = []
    try:
        for side in (True, False):  # warm both paths up
            _, uid, workspace_id = launch(side, 0)
            stop(uid, workspace_id)
        for _ in range(repeats):
            for index in range(instances):
                for side, samples in ((True, namespaced_ms), (False, shared_ms)):
                    took, uid, workspace_id = launch(side, index)
                    samples.append(took * 1000)
                    stop(uid, workspace_id)
            namespaced_kb.append(rest(True))
            shared_kb.append(rest(False))
    finally:
        nft.run(f"add table inet {table}\ndelete table inet {table}")
        shutil.rmtree(root, ignore_errors=True)
    return [
        Figure(
            name="process workspace start: own network and mount namespaces",
            unit="ms/start",
            samples=namespaced_ms,
            floor_name="shared network: mount namespace, hidden paths, per-uid nft rule",
            floor_samples=shared_ms,
            notes=f"{repeats} x {instances} launches per side, alternating; wall time until "
            "the monitor reports the instance",
        ),
        Figure(
            name="process workspace at rest: kernel memory",
            unit="KiB/workspace",
            samples=namespaced_kb,
            floor_name="shared network",
            floor_samples=shared_kb,
            notes=f"{resting} running per side, {repeats} rounds; /proc/meminfo "
            f"{' + '.join(KERNEL_FIELDS)}, during minus before (the host's other work moves it)",
        ),
    ]


if __name__ == "__main__":
    arguments = [int(value) for value in sys.argv[1:4]]
    print_figures(run(*arguments))
