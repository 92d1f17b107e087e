"""A stream whose client leaves is cancelled by the ASGI server, and that cancellation must end
it however busy its follower is: a stream that swallowed it would go on following and renewing
its place in the user's quota for as long as ``LOGS_STREAM_MAX_SECONDS`` (no one reading).

The followers below produce a line at every turn of the event loop, so a cancellation often
lands while a wait for the next line has just been answered: the moment a cancellation is lost
when a wait with a timeout is written as ``asyncio.wait_for`` on Python 3.11."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

from portal import live_events, live_logs
from provisioning.backends import follow
from provisioning.backends.base import LogItem, LogLine

ROUNDS = 150


class BusyFollower:
    """The part of the backend contract ``astream`` uses: a follower that never ends and has a
    line ready at every turn of the loop."""

    async def _lines(self) -> AsyncIterator[LogItem]:
        n = 0
        while True:
            n += 1
            yield LogLine(f"line {n}")
            await asyncio.sleep(0)

    def follow_logs(self, workspace_id: UUID, state: Any, **kwargs: Any) -> AsyncIterator[LogItem]:
        return self._lines()


async def _consume(frames: AsyncIterator[bytes]) -> None:
    async for _ in frames:
        pass


async def _cancel_after(task: asyncio.Task[None], turns: int) -> bool:
    """Cancel ``task`` after ``turns`` turns of the loop; whether it then ends within 5 s."""
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    return task in done


# Loops whose tasks did not all end, kept as they are (closing them, or collecting their tasks,
# would fail elsewhere than in the test that found them).
_LEFT: list[asyncio.AbstractEventLoop] = []


def _run(coro: Any) -> Any:
    """Run ``coro`` on a loop of its own. A task that swallowed its cancellation may never end:
    the test must report it rather than wait for it, so such a loop is left as it is."""
    loop = asyncio.new_event_loop()
    result = loop.run_until_complete(coro)
    if any(not task.done() for task in asyncio.all_tasks(loop)):
        _LEFT.append(loop)
    else:
        loop.close()
    return result


def test_a_cancelled_log_stream_ends_and_gives_its_place_back(settings) -> None:
    settings.LOGS_FOLLOW_POLL_MS = 1
    settings.LOGS_STREAM_MAX_SECONDS = 600
    settings.EVENTS_STREAM_KEEPALIVE_SECONDS = 600
    rng = random.Random(20261204)
    user = type("User", (), {"pk": 10_000_000 + rng.randrange(1_000_000)})()

    async def run() -> list[int]:
        lost = []
        backend = BusyFollower()
        for round_ in range(ROUNDS):
            slot = live_events.acquire_slot(user, kind="log", cap=ROUNDS)
            frames = live_logs.astream(backend, uuid4(), tail=0, slot=slot)  # type: ignore[arg-type]
            task = asyncio.create_task(_consume(frames))
            if not await _cancel_after(task, rng.randrange(2, 60)):
                lost.append(round_)
                break
        return lost

    lost = _run(run())
    assert lost == [], f"a cancelled stream went on (round {lost})"
    # Each stream gave its place back as it ended.
    assert live_events.open_streams(user.pk, "log") == 0


def test_a_wait_for_the_next_line_keeps_the_callers_cancellation_and_every_line() -> None:
    """``get_within``, the followers' wait for the next line with a bound: cancelled from outside
    as a line arrives, the caller is cancelled (the wait does not answer the line instead), and
    the line stays in the queue; a line is never lost to the bound's own timeout either."""
    rng = random.Random(4)

    async def run() -> tuple[list[int], int, int]:
        lost, put, taken = [], 0, 0
        for round_ in range(ROUNDS * 4):
            queue: asyncio.Queue[int] = asyncio.Queue()

            async def produce(queue: asyncio.Queue[int]) -> None:
                nonlocal put
                while True:
                    queue.put_nowait(put)
                    put += 1
                    await asyncio.sleep(0)

            async def consume(queue: asyncio.Queue[int]) -> None:
                nonlocal taken
                while True:
                    with contextlib.suppress(TimeoutError):
                        await follow.get_within(queue, rng.choice([0.0, 0.000_01, 1.0]))
                        taken += 1

            producer = asyncio.create_task(produce(queue))
            task = asyncio.create_task(consume(queue))
            if not await _cancel_after(task, rng.randrange(1, 40)):
                lost.append(round_)
                break
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            taken += queue.qsize()
        return lost, put, taken

    lost, put, taken = _run(run())
    assert lost == [], f"a cancelled wait went on (round {lost})"
    assert taken == put, f"{put - taken} of {put} lines lost"
