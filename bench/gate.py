"""The gate's acquire + release against a bare Redis ``SET NX PX`` + ``DEL``, in one run.

``provisioning.gate.hold`` does more than the floor in the same two round trips: its acquiring
script also records the holder for ``inspect workspace_gates`` (HSET + EXPIRE) and ends a wait,
its releasing script checks the token and forgets the record, and the renewer thread is started
and joined.
Both sides run against the same Redis, alternating batch by batch so drift hits both alike.

    .venv/bin/python -m bench.gate [repeats]
"""

from __future__ import annotations

import sys
import time
import uuid

from bench.common import Figure, print_figures, setup_django

BATCH = 200


def run(repeats: int = 20) -> list[Figure]:
    setup_django(database="ws_gate", redis_db=3)
    from django.conf import settings

    from provisioning import gate
    from workspaces.redis_client import get_redis

    client = get_redis()
    lease_ms = int(settings.GATE_LEASE_SECONDS) * 1000
    workspace_ids = [uuid.uuid4() for _ in range(BATCH)]
    bare_keys = [f"bench-bare:{workspace_id}" for workspace_id in workspace_ids]

    def gate_batch() -> float:
        started = time.perf_counter()
        for workspace_id in workspace_ids:
            with gate.hold(workspace_id, "bench"):
                pass
        return (time.perf_counter() - started) / BATCH * 1e6

    def bare_batch() -> float:
        started = time.perf_counter()
        for key in bare_keys:
            if not client.set(key, uuid.uuid4().hex, nx=True, px=lease_ms):
                raise RuntimeError(f"{key} was already held")
            client.delete(key)
        return (time.perf_counter() - started) / BATCH * 1e6

    gate_batch(), bare_batch()  # warm up connections and code paths
    gate_samples: list[float] = []
    bare_samples: list[float] = []
    for _ in range(repeats):
        gate_samples.append(gate_batch())
        bare_samples.append(bare_batch())
    return [
        Figure(
            name="gate acquire+release (provisioning.gate.hold)",
            unit="us/op",
            samples=gate_samples,
            floor_name="bare SET NX PX + DEL",
            floor_samples=bare_samples,
            notes=f"{repeats} batches of {BATCH} per side, interleaved; min / median / max",
        )
    ]


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
