"""Following an instance's output as it is written (``WorkspaceBackend.follow_logs``).

Two followers, both async generators so an open follow holds no thread:

* ``follow_file``: the process backend's ``agent.log``, polled. It notices a file that was
  truncated or replaced (rotation) and starts over from its beginning, and bounds what one look
  reads (a burst beyond ``max_bytes`` is skipped, and said so).
* ``follow_engine``: a Docker engine's log stream (``/containers/{name}/logs`` or, for Swarm,
  ``/services/{name}/logs``, with ``follow=1&timestamps=1``), read over the engine's socket with
  asyncio (the Docker SDK blocks a thread per open stream). A stream ends when its container
  stops; the next one resumes with ``since=`` the last line's timestamp, so lines are neither
  lost nor repeated across a restart or a replaced container.

Both ask the backend what its instance is now (``look``, a quick blocking call run in the
executor) every ``poll_seconds`` and turn the difference into ``InstanceNotice``s (``changes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlencode, urlsplit

from provisioning.backends.base import (
    BackendError,
    InstanceChange,
    InstanceNotice,
    LineSplitter,
    LogItem,
    LogLine,
    last_lines,
)

T = TypeVar("T")


async def get_within(queue: asyncio.Queue[T], seconds: float) -> T:
    """The queue's next item, or ``TimeoutError`` after ``seconds``.

    Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that lands as the item
    arrives (it returns the item instead), and a follower whose client left would then go on
    forever. ``asyncio.timeout`` tells its own cancellation from the caller's, and an item that
    arrived as either landed stays in the queue."""
    async with asyncio.timeout(seconds):
        return await queue.get()


@dataclass(frozen=True)
class Seen:
    """One look at the instance: ``key`` names it (None: there is none; a new key is a new
    instance or a new start of the same one), whether it runs, and why not."""

    key: Hashable | None
    running: bool
    detail: str = ""


def changes(before: Seen | None, after: Seen) -> list[InstanceNotice]:
    """What a follower reports when its look at the instance went from ``before`` to ``after``
    (``before`` None: the first look, which reports only an instance that is not running)."""
    if after.key is None:
        if before is None or before.key is not None:
            return [InstanceNotice(InstanceChange.GONE, after.detail or "no instance")]
        return []
    notices = []
    if before is not None and before.key is None:
        notices.append(InstanceNotice(InstanceChange.STARTED, after.detail))
    elif before is not None and after.key != before.key:
        notices.append(InstanceNotice(InstanceChange.RESTARTED, after.detail))
    if not after.running and (before is None or before.running or after.key != before.key):
        notices.append(InstanceNotice(InstanceChange.EXITED, after.detail))
    return notices


# --- A file ----------------------------------------------------------------------------------
@dataclass
class _Cursor:
    inode: int | None = None
    offset: int = 0


def _initial(path: Path, cursor: _Cursor, tail: int, max_bytes: int) -> str:
    """The last ``tail`` complete lines; leaves the cursor after the last newline, so a line
    being written is followed whole."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            start = max(0, stat.st_size - max_bytes)
            handle.seek(start)
            data = handle.read(stat.st_size - start)
    except OSError:
        return ""
    complete = data[: data.rfind(b"\n") + 1]
    cursor.inode = stat.st_ino
    cursor.offset = start + len(complete)
    return last_lines(complete, tail, max_bytes)


def _read_new(path: Path, cursor: _Cursor, max_bytes: int) -> tuple[bytes, list[InstanceNotice]]:
    notices: list[InstanceNotice] = []
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; the open may fail)
    except OSError:
        return b"", notices  # not written yet, or removed: a new file starts from 0
    with handle:
        stat = os.fstat(handle.fileno())
        if cursor.inode is not None and stat.st_ino != cursor.inode:
            notices.append(InstanceNotice(InstanceChange.TRUNCATED, "the output file was replaced"))
            cursor.offset = 0
        elif stat.st_size < cursor.offset:
            notices.append(InstanceNotice(InstanceChange.TRUNCATED, "the output file was cut"))
            cursor.offset = 0
        cursor.inode = stat.st_ino
        pending = stat.st_size - cursor.offset
        if pending > max_bytes:
            skipped = pending - max_bytes
            notices.append(InstanceNotice(InstanceChange.SKIPPED, f"{skipped} bytes skipped"))
            cursor.offset += skipped
        handle.seek(cursor.offset)
        data = handle.read(stat.st_size - cursor.offset)
        cursor.offset += len(data)
    return data, notices


async def follow_file(
    path: Path,
    look: Callable[[], Seen],
    *,
    tail: int,
    max_bytes: int,
    max_line_bytes: int,
    poll_seconds: float,
) -> AsyncIterator[LogItem]:
    cursor = _Cursor()
    lines = LineSplitter(max_line_bytes)
    initial = await asyncio.to_thread(_initial, path, cursor, tail, max_bytes)
    for text in initial.splitlines():
        yield lines.feed(text.encode() + b"\n")[0]
    seen: Seen | None = None
    while True:
        data, notices = await asyncio.to_thread(_read_new, path, cursor, max_bytes)
        for notice in notices:
            lines.flush()  # a fragment of the old file's last line is not worth showing
            yield notice
        now = await asyncio.to_thread(look)
        found = changes(seen, now)
        # A new instance is said before the lines read with it, an ended one after its last.
        begun = (InstanceChange.STARTED, InstanceChange.RESTARTED)
        for notice in found:
            if notice.change in begun:
                yield notice
        for fed in lines.feed(data):
            yield fed
        if found and seen is not None and seen.running and not now.running:
            for rest in lines.flush():  # the instance ended mid-line
                yield rest
        for notice in found:
            if notice.change not in begun:
                yield notice
        seen = now
        await asyncio.sleep(poll_seconds)


# --- A Docker engine's log stream ------------------------------------------------------------
async def _connect(host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(host or "unix:///var/run/docker.sock")
    try:
        if url.scheme == "unix":
            return await asyncio.open_unix_connection(url.path)
        if url.scheme in ("tcp", "http") and url.hostname:
            return await asyncio.open_connection(url.hostname, url.port or 2375)
    except OSError as exc:
        raise BackendError(
            f"docker: cannot reach the engine at {host}: {exc.strerror or exc}"
        ) from exc
    raise BackendError(
        f"docker: following logs needs a unix:// or tcp:// engine address, not {host!r}"
    )


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # the chunk's CRLF
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def engine_stream(host: str, path: str) -> AsyncIterator[bytes]:
    """The payload of a log stream from the engine at ``host`` (stdout and stderr together),
    until the engine ends it. Nothing when the object does not exist (404)."""
    reader, writer = await _connect(host)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: docker\r\nAccept: */*\r\n\r\n".encode("ascii"))
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").split()
        code = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        headers: dict[str, str] = {}
        while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if code == 404:
            return
        if code != 200:
            body = b"".join([chunk async for chunk in _body(reader, headers)])
            try:
                message = str(json.loads(body).get("message", ""))
            except (ValueError, AttributeError):
                message = body.decode(errors="replace")
            raise BackendError(f"docker: reading logs: {code} {message}".strip())
        multiplexed = "multiplexed" in headers.get("content-type", "")
        pending = b""
        async for chunk in _body(reader, headers):
            if not multiplexed:
                yield chunk
                continue
            # Frames of an 8-byte header (stream, 0, 0, 0, big-endian size) and the payload.
            pending += chunk
            while len(pending) >= 8:
                size = int.from_bytes(pending[4:8], "big")
                if len(pending) < 8 + size:
                    break
                yield pending[8 : 8 + size]
                pending = pending[8 + size :]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def log_path(kind: str, name: str, *, tail: str, since: str | None) -> str:
    params = {"follow": "1", "stdout": "1", "stderr": "1", "timestamps": "1", "tail": tail}
    if since is not None:
        params["since"] = since
    return f"/{kind}/{quote(name, safe='')}/logs?{urlencode(params)}"


def _timestamp(stamp: bytes) -> tuple[int, int] | None:
    """``2026-01-02T03:04:05.123456789Z`` -> (seconds, nanoseconds), as ``since=`` takes it."""
    text = stamp.decode("ascii", errors="replace")
    whole, _, fraction = text.rstrip("Z").partition(".")
    try:
        moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    digits = "".join(ch for ch in fraction if ch.isdigit())[:9]
    return int(moment.timestamp()), int(digits.ljust(9, "0"))


async def _pump(
    host: str, path: str, queue: asyncio.Queue[LogLine | None], max_line_bytes: int
) -> None:
    # Each line starts with its timestamp (~31 bytes), which is cut off after splitting.
    lines = LineSplitter(max_line_bytes + 40)
    try:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            # The engine closing the stream mid-frame is an end like any other.
            async for payload in engine_stream(host, path):
                for line in lines.feed(payload):
                    await queue.put(line)
        for line in lines.flush():
            await queue.put(line)
    except Exception:
        await queue.put(None)  # this stream ended (the follower reads why from the task)
        raise
    # Not in a ``finally``: cancelled, the follower no longer reads the queue, and on a full
    # queue waiting to put the end mark would never end.
    await queue.put(None)  # this stream ended


async def follow_engine(
    host: str,
    look: Callable[[], Seen],
    path_for: Callable[[str, str | None], str],
    *,
    tail: int,
    max_bytes: int,
    max_line_bytes: int,
    poll_seconds: float,
) -> AsyncIterator[LogItem]:
    """``path_for(tail, since)`` is the log stream's path. A stream is (re)opened when the
    instance runs and none is open, or when a new instance has not been read yet."""
    queue: asyncio.Queue[LogLine | None] = asyncio.Queue(maxsize=1000)
    reader: asyncio.Task[None] | None = None
    last: tuple[int, int] | None = None
    seen: Seen | None = None
    read_key: Hashable | None = None
    first = True

    def unseen(item: LogLine) -> LogLine | None:
        """The line without its timestamp, or None when it was sent already (``since=`` is
        inclusive, and a reopened stream starts at the last line sent)."""
        nonlocal last
        stamp, _, text = item.text.encode().partition(b" ")
        moment = _timestamp(stamp)
        if moment is not None and last is not None and moment <= last:
            return None
        last = moment or last
        line = LineSplitter(max_line_bytes).feed(text + b"\n")[0]
        return LogLine(line.text, truncated=item.truncated or line.truncated)

    try:
        while True:
            # What the stream delivered goes first: an instance's last lines come before the
            # notice that it exited.
            sent = 0
            while not queue.empty() and sent < max_bytes:
                item = queue.get_nowait()
                if item is not None and (line := unseen(item)) is not None:
                    sent += len(line.text)
                    yield line
            now = await asyncio.to_thread(look)
            for notice in changes(seen, now):
                yield notice
            seen = now
            if reader is not None and reader.done():
                error = reader.exception()
                reader = None
                if error is not None:
                    raise error
            if reader is not None and now.key != read_key:
                # A new instance: the open stream may be the old one's and never end (a removed
                # Swarm service's does not). Read on from the new one, from the last line sent.
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, BackendError, OSError):
                    await reader
                reader = None
            if reader is None and now.key is not None and (now.running or now.key != read_key):
                if first and tail <= 0:
                    # Only what comes from now on, also across a restart before the first line.
                    now_ns = datetime.now(UTC).timestamp()
                    last = (int(now_ns), int((now_ns % 1) * 1e9))
                since = None if last is None else f"{last[0]}.{last[1]:09d}"
                count = str(max(tail, 0)) if first else "all"
                reader = asyncio.create_task(
                    _pump(host, path_for(count, since), queue, max_line_bytes)
                )
                read_key, first = now.key, False
            # Wait for a line up to one poll; the rest that is there goes at the loop's top.
            with contextlib.suppress(TimeoutError):
                item = await get_within(queue, poll_seconds)
                if item is not None and (line := unseen(item)) is not None:
                    yield line
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendError, OSError):
                await reader
