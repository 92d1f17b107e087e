#!/usr/bin/env python3
"""Workspace agent: runs inside a workspace, registers it with the platform and heartbeats.

Standard library only, so it runs in any image with a Python 3. Configuration comes from the
environment the platform sets: ``WORKSPACE_ID``, ``WORKSPACE_TOKEN``, ``PLATFORM_URL``; optional
``AGENT_HEARTBEAT_SECONDS`` (default 5), ``AGENT_BOOT_DELAY_SECONDS`` (a slow runtime's boot),
``AGENT_IGNORE_SIGTERM`` (for testing slow stops).

Health: each heartbeat carries ``healthy``. The workspace is unhealthy while the file
``AGENT_UNHEALTHY_FILE`` exists (default ``$WORKSPACE_CONFIG_DIR/.unhealthy`` when the config
directory is known), or while ``AGENT_HEALTH_COMMAND`` (optional, run with ``sh -c``) exits
non-zero or takes longer than ``AGENT_HEALTH_TIMEOUT_SECONDS`` (default 5). The platform shows an
unhealthy workspace as ``degraded`` and a healthy one as ``online``.

Activity (the idle auto-stop policy): a heartbeat carries ``active: true`` when the file
``AGENT_ACTIVITY_FILE`` (default ``$WORKSPACE_CONFIG_DIR/.activity``) was touched since the
previous heartbeat. Anything in the workspace (a shell prompt hook, an editor plugin, a job) can
``touch`` it to say "in use".

The app: when ``WORKSPACE_APP_PORT`` is set the agent runs ``WORKSPACE_APP_COMMAND`` (``sh -c``)
or, without one, serves a small page itself on that port (127.0.0.1), and registers only once
``http://127.0.0.1:<port><WORKSPACE_APP_HEALTH_PATH>`` answers below 400; a heartbeat is healthy
only while it still does.

Exit codes: 0 on SIGTERM; 3 when the platform rejects the token (a newer cycle replaced this
one, or the workspace is gone), so a stale instance never lingers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

# Start-up is paid by every workspace start, so only modules that cost next to nothing to import
# are imported here: the platform calls and the default page speak HTTP/1.1 on plain sockets
# (urllib, http.server and json would triple the interpreter's start), and ``subprocess`` is
# imported only for a health or app command.

EXIT_REJECTED = 3
_stop = threading.Event()
# An answer is read up to this size (the platform's answers and a page's headers are far smaller).
_MAX_ANSWER = 65536


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} agent: {message}", flush=True)


def _json_string(value: str) -> str:
    escaped = []
    for char in value:
        if char in '\\"':
            escaped.append("\\" + char)
        elif char < " ":
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _json(body: dict[str, str | bool]) -> bytes:
    """A JSON object of strings and booleans (all the agent ever sends)."""
    items = (
        f"{_json_string(key)}: "
        + (("true" if value else "false") if isinstance(value, bool) else _json_string(value))
        for key, value in body.items()
    )
    return ("{" + ", ".join(items) + "}").encode()


def _split_url(url: str) -> tuple[str, str, int, str]:
    """The authority (the Host header), host, port and path of an ``http://`` URL (ValueError
    otherwise)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "http" or not rest:
        raise ValueError(f"not an http:// URL: {url}")
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):  # [IPv6]:port
        host, _, port = authority[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = authority.partition(":")
    return authority, host, int(port or 80), (slash + path) or "/"


def _http(
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    body: bytes = b"",
    timeout: float,
    read_body: bool = True,
) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a connection of its own (closed after it): the status and, with
    ``read_body``, the body (as sent: a chunked one stays chunked). OSError when the peer cannot
    be reached or stops answering, ValueError when its answer is not HTTP."""
    authority, host, port, path = _split_url(url)
    head = [f"{method} {path} HTTP/1.1", f"Host: {authority}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        answer = b""
        while len(answer) < _MAX_ANSWER:
            chunk = connection.recv(_MAX_ANSWER)
            if not chunk:
                break
            answer += chunk
            header_end = answer.find(b"\r\n\r\n")
            if header_end >= 0 and (not read_body or _complete(answer, header_end)):
                break
    status_line, _, rest = answer.partition(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer from {authority}")
    return int(parts[1]), rest.partition(b"\r\n\r\n")[2]


def _complete(answer: bytes, header_end: int) -> bool:
    """Whether the whole body has arrived: as long as its Content-Length says, or up to the last
    chunk of a chunked one; without either, the peer's close ends it."""
    body = len(answer) - header_end - 4
    for line in answer[:header_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length" and value.isdigit():
            return body >= int(value)
        if name == b"transfer-encoding" and value.endswith(b"chunked"):
            return answer.endswith(b"0\r\n\r\n")
    return False


def _post(
    url: str, token: str, body: dict[str, str | bool], timeout: float = 5.0
) -> tuple[int, str]:
    """POST ``body`` as JSON with the workspace's bearer token: the status and the answer's text
    (what the platform says, for the log)."""
    data = _json(body)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if url.lower().startswith("https://"):
        return _post_tls(url, headers, data, timeout)
    status, answer = _http("POST", url, headers=headers, body=data, timeout=timeout)
    return status, answer[:300].decode(errors="replace")


def _post_tls(url: str, headers: dict[str, str], data: bytes, timeout: float) -> tuple[int, str]:
    # A platform behind TLS: the standard library's client, imported only then.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(300).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode(errors="replace")


def _unhealthy_file() -> str | None:
    explicit = os.environ.get("AGENT_UNHEALTHY_FILE")
    if explicit:
        return explicit
    config_dir = os.environ.get("WORKSPACE_CONFIG_DIR")
    return os.path.join(config_dir, ".unhealthy") if config_dir else None


def _activity_file() -> str | None:
    explicit = os.environ.get("AGENT_ACTIVITY_FILE")
    if explicit:
        return explicit
    config_dir = os.environ.get("WORKSPACE_CONFIG_DIR")
    return os.path.join(config_dir, ".activity") if config_dir else None


def _activity_mark() -> float | None:
    path = _activity_file()
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _healthy() -> bool:
    marker = _unhealthy_file()
    if marker and os.path.exists(marker):
        return False
    command = os.environ.get("AGENT_HEALTH_COMMAND")
    if command:
        import subprocess

        timeout = float(os.environ.get("AGENT_HEALTH_TIMEOUT_SECONDS", "5"))
        try:
            check = subprocess.run(
                ["sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return check.returncode == 0
    return True


# --- the app ------------------------------------------------------------------------------------
def _app_health_url() -> str | None:
    port = os.environ.get("WORKSPACE_APP_PORT")
    if not port:
        return None
    return f"http://127.0.0.1:{port}{os.environ.get('WORKSPACE_APP_HEALTH_PATH', '/')}"


def _app_answers() -> bool:
    url = _app_health_url()
    if url is None:
        return True
    try:
        status, _ = _http("GET", url, headers={}, timeout=3, read_body=False)
    except (OSError, ValueError):
        return False
    return status < 400


def _page_server(port: int) -> socket.socket:
    """The default page on ``WORKSPACE_APP_HOST`` (127.0.0.1 unless the platform says the
    workspace has an address of its own):``port``, every path, one thread per connection."""
    page = _read_page()
    host = os.environ.get("WORKSPACE_APP_HOST", "127.0.0.1")
    listener = socket.create_server((host, port), backlog=64)

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_answer_page, args=(connection, page), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _read_page() -> bytes:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html"), "rb") as f:
        return f.read()


def _answer_page(connection: socket.socket, page: bytes) -> None:
    with connection:
        try:
            connection.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < _MAX_ANSWER:
                chunk = connection.recv(8192)
                if not chunk:
                    return
                request += chunk
            method = request.split(b" ", 1)[0]
            if method in (b"GET", b"HEAD"):
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(page)
                )
                connection.sendall(head + (page if method == b"GET" else b""))
            else:
                connection.sendall(
                    b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
        except OSError:
            pass


def _start_app() -> object | None:
    """The app's process (a ``subprocess.Popen``), or None when the agent serves the page."""
    port = os.environ.get("WORKSPACE_APP_PORT")
    if not port:
        return None
    command = os.environ.get("WORKSPACE_APP_COMMAND")
    if command:
        import subprocess

        _log(f"starting the app on port {port}")
        return subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL)
    _page_server(int(port))
    _log(f"serving the default page on port {port}")
    return None


def _stop_app(app: object | None) -> None:
    if app is None:
        return
    import subprocess  # already loaded: _start_app started the app with it

    assert isinstance(app, subprocess.Popen)
    if app.poll() is not None:
        return
    app.terminate()
    try:
        app.wait(timeout=5)
    except subprocess.TimeoutExpired:
        app.kill()


def _on_sigterm(signum: int, frame: object) -> None:
    _log("SIGTERM received, exiting")
    _stop.set()


def _await_claim() -> bool:
    """A warm pool's member (``WORKSPACE_POOL=1``): wait, booted, for the platform to write the
    claim (JSON: identity, token, env) to ``WORKSPACE_CLAIM_FILE`` and send SIGUSR1; then take
    it into the environment and delete it. False when told to stop first.

    SIGUSR1 is blocked before the ready file says "waiting", so a claim's signal is never lost
    nor fatal: it stays pending until ``sigtimedwait`` takes it. The timeout is a backstop only.
    """
    claim = os.environ.get("WORKSPACE_CLAIM_FILE", "")
    if not claim:
        _log("WORKSPACE_POOL=1 without WORKSPACE_CLAIM_FILE")
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    import json  # the claim's format, loaded while nobody waits

    with open(claim + ".ready", "w"):
        pass
    _log("pool member ready, waiting for a claim")
    while not _stop.is_set():
        try:
            with open(claim, encoding="utf-8") as handle:
                values = json.load(handle)
        except FileNotFoundError:
            signal.sigtimedwait({signal.SIGUSR1}, 1.0)
            continue
        os.unlink(claim)
        os.environ.pop("WORKSPACE_POOL", None)
        os.environ.update({str(key): str(value) for key, value in values.items()})
        # The app and its children must not inherit the blocked signal.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        _log("claimed")
        return True
    return False


def main() -> int:
    if os.environ.get("AGENT_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    boot_delay = float(os.environ.get("AGENT_BOOT_DELAY_SECONDS", "0"))
    if boot_delay and _stop.wait(boot_delay):
        return 0
    # A pool member boots before anyone asks, then waits to learn who it is.
    if os.environ.get("WORKSPACE_POOL") == "1" and not _await_claim():
        return 0
    workspace_id = os.environ["WORKSPACE_ID"]
    token = os.environ["WORKSPACE_TOKEN"]
    base = os.environ["PLATFORM_URL"].rstrip("/")
    interval = float(os.environ.get("AGENT_HEARTBEAT_SECONDS", "5"))
    app = _start_app()
    try:
        return _run(workspace_id, token, base, interval)
    finally:
        _stop_app(app)


def _run(workspace_id: str, token: str, base: str, interval: float) -> int:
    # Online means the app answers too: register only once its health path does. The first
    # checks and retries come quickly (a small app listens within milliseconds; a network link
    # may be wired just after the agent started), then back off.
    delay = 0.05
    while not _app_answers():
        if _stop.wait(delay):
            return 0
        delay = min(delay * 2, 2.0)
    body: dict[str, str | bool] = {"workspace_id": workspace_id}
    delay = 0.05
    while not _stop.is_set():
        try:
            status, payload = _post(f"{base}/api/registry/register", token, body)
        except (OSError, ValueError) as exc:
            status, payload = 0, str(exc)
        if status == 200:
            _log(f"registered workspace {workspace_id}")
            break
        if status in (401, 403, 404, 410):
            _log(f"registration rejected ({status}): {payload}")
            return EXIT_REJECTED
        _log(f"registration not accepted yet ({status}): {payload}")
        _stop.wait(delay)
        delay = min(delay * 2, 5.0)

    was_healthy = True
    activity_seen = _activity_mark()
    while not _stop.wait(interval):
        healthy = _healthy() and _app_answers()
        mark = _activity_mark()
        active = mark is not None and mark != activity_seen
        activity_seen = mark
        if healthy != was_healthy:
            _log("healthy again" if healthy else "reporting unhealthy")
            was_healthy = healthy
        try:
            status, payload = _post(
                f"{base}/api/registry/heartbeat",
                token,
                {**body, "healthy": healthy, "active": active},
            )
        except (OSError, ValueError) as exc:
            _log(f"heartbeat failed: {exc}")
            continue
        if status in (401, 403, 404, 410):
            _log(f"heartbeat rejected ({status}): {payload}")
            return EXIT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
