"""Run inside a workspace (as its uid, in its namespaces): try to cross the boundary and print
what happened as JSON. Standard library only. Argument: a JSON object with the targets."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys


def connect(host: str, port: int) -> str:
    """``host`` may carry an IPv6 scope (``fe80::1%eth0``): getaddrinfo resolves it into the
    address's scope id."""
    try:
        [(family, kind, _, _, address)] = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
        with socket.socket(family, kind) as sock:
            sock.settimeout(3)
            sock.connect(address)
        return "connected"
    except OSError as exc:
        return f"refused: {exc.__class__.__name__}"


def connect_unix(path: str) -> str:
    """``@name`` is the abstract socket ``name``. A socket of another type than a stream's is
    tried as a datagram and a seqpacket socket too (the kernel says EPROTOTYPE first)."""
    address = "\0" + path[1:] if path.startswith("@") else path
    result = "refused: no type"
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        try:
            with socket.socket(socket.AF_UNIX, kind) as sock:
                sock.settimeout(3)
                sock.connect(address)
            return "connected"
        except OSError as exc:
            result = f"refused: {exc.__class__.__name__}"
            if exc.errno != errno.EPROTOTYPE:
                return result
    return result


def read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.read()
        return "read"
    except OSError as exc:
        return f"refused: {exc.__class__.__name__}"


def listdir(path: str) -> str:
    try:
        os.listdir(path)
        return "listed"
    except OSError as exc:
        return f"refused: {exc.__class__.__name__}"


def kill(pid: int) -> str:
    try:
        os.kill(pid, signal.SIGCONT)  # harmless if it were allowed
        return "signalled"
    except OSError as exc:
        return f"refused: {exc.__class__.__name__}"


def main() -> None:
    targets = json.loads(sys.argv[1])
    with open("/proc/self/status") as handle:
        status = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
    result: dict[str, object] = {
        "uid": os.getuid(),
        "groups": os.getgroups(),
        "no_new_privs": status.get("NoNewPrivs", "").strip(),
        "cap_eff": status.get("CapEff", "").strip(),
    }
    result["tcp"] = {f"{h}:{p}": connect(h, p) for h, p in targets.get("tcp", [])}
    result["unix"] = {path: connect_unix(path) for path in targets.get("unix", [])}
    result["read"] = {path: read(path) for path in targets.get("read", [])}
    result["list"] = {path: listdir(path) for path in targets.get("list", [])}
    result["kill"] = {str(pid): kill(pid) for pid in targets.get("kill", [])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
