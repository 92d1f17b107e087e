"""``follow_logs`` of the real backends: the process backend's follower on a real ``agent.log``
appended by real processes (cut, replaced, restarted instances), and the Docker backend's on a
real engine's container writing lines (stopped, replaced). The API around them is tested on the
fake backend in tests/portal/test_log_stream.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.backends.base import (
    InstanceChange,
    InstanceNotice,
    LaunchSpec,
    LineSplitter,
    LogItem,
    LogLine,
)
from provisioning.backends.follow import Seen, changes
from provisioning.backends.process import ProcessBackend
from tests.support import next_backend_uid
from workspaces.manifests import Template

# A guard against a follower that never delivers (the test fails instead of hanging); never
# an assertion about how fast anything is.
GUARD_SECONDS = 60.0


class Follow:
    """Drive an async follower from a synchronous test, one item at a time."""

    def __init__(self, follower: AsyncIterator[LogItem]) -> None:
        self.loop = asyncio.new_event_loop()
        self.follower = follower
        self.seen: list[LogItem] = []

    def next(self) -> LogItem:
        item = self.loop.run_until_complete(asyncio.wait_for(anext(self.follower), GUARD_SECONDS))
        self.seen.append(item)
        return item

    def until(self, wanted: Callable[[LogItem], bool]) -> list[LogItem]:
        """Items up to and including the first one ``wanted`` accepts."""
        taken = []
        while True:
            item = self.next()
            taken.append(item)
            if wanted(item):
                return taken

    def close(self) -> None:
        closer = getattr(self.follower, "aclose", None)
        if closer is not None:
            self.loop.run_until_complete(closer())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


def line(text: str) -> Callable[[LogItem], bool]:
    return lambda item: isinstance(item, LogLine) and item.text == text


def starts(prefix: str) -> Callable[[LogItem], bool]:
    return lambda item: isinstance(item, LogLine) and item.text.startswith(prefix)


def notice(change: InstanceChange) -> Callable[[LogItem], bool]:
    return lambda item: isinstance(item, InstanceNotice) and item.change == change


def texts(items: list[LogItem]) -> list[str]:
    return [item.text for item in items if isinstance(item, LogLine)]


# --- the pieces ------------------------------------------------------------------------------
def test_line_splitter_bounds_lines_and_keeps_partial_ones() -> None:
    lines = LineSplitter(5)
    assert lines.feed(b"ab") == []
    assert lines.feed(b"c\r\ndefghij\nk") == [LogLine("abc"), LogLine("defgh", truncated=True)]
    assert lines.feed(b"l\n") == [LogLine("kl")]
    assert lines.feed(b"x" * 10_000) == []  # an endless line costs max_line_bytes, no more
    assert lines.flush() == [LogLine("xxxxx", truncated=True)]
    assert lines.flush() == []


def test_changes_between_two_looks() -> None:
    up, down, none = Seen("a", True), Seen("a", False, "exited 1"), Seen(None, False, "no box")
    assert changes(None, up) == []
    assert changes(None, none) == [InstanceNotice(InstanceChange.GONE, "no box")]
    assert changes(None, down) == [InstanceNotice(InstanceChange.EXITED, "exited 1")]
    assert changes(up, down) == [InstanceNotice(InstanceChange.EXITED, "exited 1")]
    assert changes(down, down) == []
    assert changes(up, Seen("b", True, "new")) == [InstanceNotice(InstanceChange.RESTARTED, "new")]
    assert changes(none, up) == [InstanceNotice(InstanceChange.STARTED, "")]
    assert changes(up, none) == [InstanceNotice(InstanceChange.GONE, "no box")]
    assert changes(none, none) == []


# --- the process backend ---------------------------------------------------------------------
@pytest.fixture
def unisolated(settings: Any) -> Iterator[ProcessBackend]:
    # Not an isolation test: the instances run as the platform's user, so no uid, no firewall.
    settings.WORKSPACE_PROCESS_ISOLATION = "none"
    data = Path(tempfile.mkdtemp(prefix="ws-follow-test-"))
    backend = ProcessBackend(data)
    yield backend
    for info in backend.list_instances():
        backend.stop(uuid.UUID(info.workspace_id), {}, grace_seconds=0.2)
    shutil.rmtree(data, ignore_errors=True)


def _ticker(tmp_path: Path, workspace_id: uuid.UUID, generation: int, word: str) -> LaunchSpec:
    """An instance that says ``<word> 0``, ``<word> 1``, ... a few times a second, forever."""
    program = (
        "import itertools, time\n"
        f"for n in itertools.count():\n    print('{word}', n, flush=True)\n    time.sleep(0.1)\n"
    )
    template = Template(
        name="t", path=tmp_path, runtime="shell", command=("{python}", "-c", program)
    )
    return LaunchSpec(workspace_id, generation, template, {"WORKSPACE_ID": str(workspace_id)})


def test_process_follower_tails_a_growing_file_through_cuts_rotation_and_restarts(
    unisolated: ProcessBackend, tmp_path: Path
) -> None:
    backend = unisolated
    workspace_id = uuid.uuid4()
    log = backend.root / str(workspace_id) / "agent.log"
    backend.start(_ticker(tmp_path, workspace_id, 1, "first"), {})
    # Enough output for a tail to be a tail.
    from tests.support import wait_for

    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 5, message="output")

    follow = Follow(
        backend.follow_logs(
            workspace_id, {}, tail=3, max_bytes=64 * 1024, max_line_bytes=200, poll_seconds=0.05
        )
    )
    try:
        tail = [follow.next() for _ in range(3)]
        assert all(starts("first ")(item) for item in tail)
        numbers = [int(item.text.split()[1]) for item in tail if isinstance(item, LogLine)]
        assert numbers == list(range(numbers[0], numbers[0] + 3))  # the last three, in order
        # New lines arrive as the process writes them, none lost, none repeated.
        later = follow.until(line(f"first {numbers[-1] + 5}"))
        assert texts(later) == [f"first {n}" for n in range(numbers[-1] + 1, numbers[-1] + 6)]

        # Cut under the follower: it says so and reads the file again from its start.
        with open(log, "r+b") as handle:
            handle.truncate(0)
        cut = follow.until(notice(InstanceChange.TRUNCATED))
        assert all(isinstance(item, LogLine) for item in cut[:-1])
        assert starts("first ")(follow.next())

        # Rotated, and a new cycle's instance writes a new file: both are said, and the new
        # instance's lines follow.
        os.replace(log, log.with_name("agent.log.1"))
        backend.start(_ticker(tmp_path, workspace_id, 2, "second"), {})
        restarted = follow.until(line("second 0"))
        changes_seen = [item.change for item in restarted if isinstance(item, InstanceNotice)]
        assert InstanceChange.TRUNCATED in changes_seen  # the file was replaced
        assert InstanceChange.RESTARTED in changes_seen
        assert "second 1" in texts(follow.until(line("second 1")))

        # The instance stops: the follower says so, with the backend's reason.
        backend.stop(workspace_id, {}, grace_seconds=2)
        exited = follow.until(notice(InstanceChange.EXITED))[-1]
        assert isinstance(exited, InstanceNotice) and "has exited" in exited.detail

        # Removed: gone.
        backend.remove(workspace_id, {})
        follow.until(notice(InstanceChange.GONE))
    finally:
        follow.close()


def test_process_follower_of_a_workspace_that_never_ran(unisolated: ProcessBackend) -> None:
    follow = Follow(
        unisolated.follow_logs(
            uuid.uuid4(), {}, tail=10, max_bytes=1024, max_line_bytes=100, poll_seconds=0.05
        )
    )
    try:
        assert follow.next() == InstanceNotice(InstanceChange.GONE, "no process recorded")
    finally:
        follow.close()


def test_process_follower_skips_a_burst_beyond_its_read_bound(
    unisolated: ProcessBackend,
) -> None:
    workspace_id = uuid.uuid4()
    folder = unisolated.root / str(workspace_id)
    folder.mkdir(parents=True)
    log = folder / "agent.log"
    log.write_bytes(b"before\n")
    follow = Follow(
        unisolated.follow_logs(
            workspace_id, {}, tail=1, max_bytes=1024, max_line_bytes=100, poll_seconds=0.05
        )
    )
    try:
        assert follow.next() == LogLine("before")
        with open(log, "ab") as handle:  # written by this test's process, in one go
            handle.write(b"".join(b"burst %d\n" % n for n in range(1000)) + b"after\n")
        items = follow.until(line("after"))
        skipped = [item for item in items if isinstance(item, InstanceNotice)]
        assert skipped and skipped[0].change == InstanceChange.SKIPPED
        assert sum(len(text) + 1 for text in texts(items)) <= 1024 + 100
    finally:
        follow.close()


# --- the Docker backend (a real engine) ------------------------------------------------------
@pytest.mark.docker
def test_docker_follower_streams_a_containers_new_lines_across_a_restart(
    docker_engine: Any, tmp_path: Path
) -> None:
    from provisioning.backends import FACTORIES
    from provisioning.backends.docker import DockerBackend

    backend = FACTORIES["docker"]()
    assert isinstance(backend, DockerBackend)
    workspace_id = uuid.uuid4()
    uid = next_backend_uid()

    def spec(generation: int, word: str) -> LaunchSpec:
        script = f"i=0; while true; do echo {word} $i; i=$((i+1)); sleep 0.2; done"
        template = Template(
            name="t", path=tmp_path, runtime="shell", command=("/bin/sh", "-c", script)
        )
        return LaunchSpec(
            workspace_id,
            generation,
            template,
            {"WORKSPACE_ID": str(workspace_id), "PLATFORM_URL": "http://127.0.0.1:9"},
            # DOCKER_NETWORK_MODE=veth numbers the workspace's link by its uid.
            uid=uid,
        )

    first = spec(1, "first")
    backend.start(first, backend.prepare(first, {}))
    follow = Follow(
        backend.follow_logs(
            workspace_id, {}, tail=2, max_bytes=64 * 1024, max_line_bytes=200, poll_seconds=0.2
        )
    )
    try:
        opening = follow.next()
        assert starts("first ")(opening)
        assert isinstance(opening, LogLine)
        start = int(opening.text.split()[1])
        # New lines arrive while the container writes them, in order, none repeated.
        later = follow.until(line(f"first {start + 6}"))
        assert texts(later) == [f"first {n}" for n in range(start + 1, start + 7)]

        backend.stop(workspace_id, {}, grace_seconds=1)
        exited = follow.until(notice(InstanceChange.EXITED))[-1]
        assert isinstance(exited, InstanceNotice) and "exited" in exited.detail

        # A new cycle replaces the container: said, and its lines follow from its first one
        # (since= the last line seen: nothing of the first container comes again).
        second = spec(2, "second")
        backend.start(second, backend.prepare(second, {}))
        after = follow.until(line("second 2"))
        # Replaced: seen as a new container, or as none for a moment and then a new one.
        said = {item.change for item in after if isinstance(item, InstanceNotice)}
        assert said & {InstanceChange.RESTARTED, InstanceChange.STARTED}, said
        assert texts(after)[-3:] == ["second 0", "second 1", "second 2"]
        # Every line once, in the order written: the first container's, then the second's.
        every = texts(follow.seen)
        assert len(every) == len(set(every))
        firsts = [int(text.split()[1]) for text in every if text.startswith("first ")]
        assert firsts == list(range(firsts[0], firsts[0] + len(firsts)))
        assert every[len(firsts) :] == ["second 0", "second 1", "second 2"]

        backend.remove(workspace_id, {})
        follow.until(notice(InstanceChange.GONE))
    finally:
        follow.close()
        backend.remove(workspace_id, {})
