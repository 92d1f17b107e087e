"""``services.record_activity``, the per-request activity signal, against what it saves.

The proxy calls it on every request it lets through. Two figures, each beside its floor in one
run, batches interleaved:

* **skipped** (the common case: the workspace was recorded less than
  ``ACTIVITY_WRITE_INTERVAL_SECONDS`` ago): one Redis ``SET NX EX`` that finds the key; floor: a
  bare ``SET NX EX`` on an existing key with the same client.
* **unthrottled alternative**: the floor is what it replaces, one ``UPDATE ... SET
  last_activity_at`` by primary key per request (autocommit), measured on the same rows.

    .venv/bin/python -m bench.activity [repeats]
"""

from __future__ import annotations

import sys
import time
import uuid

from bench.common import Figure, print_figures, setup_django, shell_rows

BATCH = 200


def run(repeats: int = 20) -> list[Figure]:
    setup_django(database="ws_activity_bench", redis_db=3)
    from django.contrib.auth.models import User
    from django.utils import timezone

    from workspaces import services
    from workspaces.models import Workspace
    from workspaces.redis_client import get_redis

    owner, _ = User.objects.get_or_create(username="bench-activity")
    Workspace.objects.filter(owner=owner).delete()
    rows = shell_rows(owner, [f"act-{n}" for n in range(BATCH)])
    ids = [row.id for row in rows]
    client = get_redis()
    for workspace_id in ids:
        services.record_activity(workspace_id, "bench")  # every key present from here on
    bare_keys = [f"bench-activity-bare:{uuid.uuid4()}" for _ in range(BATCH)]
    for key in bare_keys:
        client.set(key, "x", ex=3600)

    def skipped_batch() -> float:
        started = time.perf_counter()
        for workspace_id in ids:
            if services.record_activity(workspace_id, "proxy"):
                raise RuntimeError("a call within the interval wrote the row")
        return (time.perf_counter() - started) / BATCH * 1e6

    def bare_set_batch() -> float:
        started = time.perf_counter()
        for key in bare_keys:
            client.set(key, "proxy", nx=True, ex=3600)
        return (time.perf_counter() - started) / BATCH * 1e6

    def update_batch() -> float:
        started = time.perf_counter()
        for workspace_id in ids:
            Workspace.objects.filter(id=workspace_id).update(last_activity_at=timezone.now())
        return (time.perf_counter() - started) / BATCH * 1e6

    skipped_batch(), bare_set_batch(), update_batch()  # warm up
    skipped: list[float] = []
    bare: list[float] = []
    updates: list[float] = []
    for _ in range(repeats):
        skipped.append(skipped_batch())
        bare.append(bare_set_batch())
        updates.append(update_batch())
    # The rate limit's own keys expire after ACTIVITY_WRITE_INTERVAL_SECONDS.
    client.delete(*bare_keys)
    Workspace.objects.filter(owner=owner).delete()
    notes = f"{repeats} batches of {BATCH} per side, interleaved; min / median / max"
    return [
        Figure(
            name="record_activity within the interval (skipped)",
            unit="us/call",
            samples=skipped,
            floor_name="bare SET NX EX on an existing key",
            floor_samples=bare,
            notes=notes,
        ),
        Figure(
            name="record_activity within the interval (skipped)",
            unit="us/call",
            samples=skipped,
            floor_name="an UPDATE of last_activity_at by primary key per request",
            floor_samples=updates,
            notes=notes + "; a ratio below 1 is what the rate limit saves",
        ),
    ]


if __name__ == "__main__":
    print_figures(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
