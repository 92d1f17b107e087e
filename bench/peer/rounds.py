"""A round of the peer comparison, whatever the side: N requests at once, polling until all N
are up, and the alternation of rounds between the two sides (see ``bench.peer``)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile

TIMEOUT = 900.0  # seconds a round may take before it fails


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


def together(n: int, task: Callable[[int], Any]) -> list[Any]:
    """Run ``task(index)`` in n threads released together (a barrier)."""
    barrier = threading.Barrier(n)

    def go(index: int) -> Any:
        barrier.wait()
        return task(index)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(go, range(n)))


def requests_and_watch(
    n: int,
    request: Callable[[int], tuple[str, float]],
    count: Callable[[], int],
    failed: Callable[[], list[str]],
    interval: float,
    what: str,
) -> dict[str, float]:
    """Send n requests at once (``request(index) -> (key, sent)``, in threads released together)
    while polling ``count()`` (how many are up) every ``interval`` until n are up; ``failed()``
    (checked every 2 s once every request has returned) names failures. Returns key -> sent."""
    with ThreadPoolExecutor(max_workers=1) as runner:
        requests = runner.submit(together, n, request)
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


Side = tuple[Callable[[int], Run], Callable[[], None]]  # a round of N, and the cleanup after it


def alternate(args: Any, here: Side, hub: Side) -> dict[tuple[str, int], list[Run]]:
    """One untimed round of one on each side (imports, connections, the page cache), then
    ``args.rounds`` rounds of each size on each side, the side that goes first flipping every
    round, cleaned after each round (untimed). Whatever is left is cleaned when it fails."""
    sides = {"here": here, "hub": hub}
    runs: dict[tuple[str, int], list[Run]] = {}
    try:
        for one_round, clean in sides.values():
            clean()
            one_round(1)
            clean()
        for n in args.sizes:
            for index in range(args.rounds):
                order = ["here", "hub"] if index % 2 == 0 else ["hub", "here"]
                for side in order:
                    one_round, clean = sides[side]
                    result = one_round(n)
                    clean()
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
        here[1]()
        with contextlib.suppress(Exception):  # the hub removes what is left when it stops
            hub[1]()
    return runs
