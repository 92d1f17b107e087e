"""The Docker backend's network boundary on this host: what a workspace bridge may reach of it.

The bridges of Docker workspace networks, and the host ends of veth links, are named
``DOCKER_BRIDGE_PREFIX`` + part of the workspace id, so one interface wildcard (``-i wsbr+``)
matches every one of them, in a chain of the platform's (``<WORKSPACE_FIREWALL_CHAIN>-BRIDGE``,
iptables and ip6tables) jumped to from ``INPUT`` and ``FORWARD``. A packet that comes in from
such an interface may start a TCP connection to a registry port on a host address (the agent
calling the platform at its gateway) and nothing else: not PostgreSQL or Redis listening on every
address, not sshd, not the engine's TCP socket, not a route out. Replies to connections the host
opened (the proxy reaching a workspace's app) pass.

The chain is rebuilt in one ``iptables-restore --noflush`` transaction, so there is no moment
with a half-written chain, and only when it differs from what is wanted (idempotent, cheap).
"""

from __future__ import annotations

import fcntl
import re
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from provisioning.backends.netfilter import FirewallError, restore, run

_installed: set[tuple[str, ...]] = set()
_lock = threading.Lock()


def _ensure_chain(tool: str, chain: str, rules: list[str], hooks: tuple[str, ...]) -> None:
    """Make ``chain`` hold exactly ``rules`` and be jumped to first from each of ``hooks``."""
    current = run([tool, "-w", "-S", chain])
    wanted = [f"-N {chain}", *rules]
    if current.returncode != 0 or current.stdout.splitlines() != wanted:
        restored = restore(tool, [f":{chain} - [0:0]", *rules])
        if restored.returncode != 0:
            raise FirewallError(f"{tool}-restore: {restored.stderr.strip()}")
    for hook in hooks:
        if run([tool, "-w", "-C", hook, "-j", chain]).returncode != 0:
            inserted = run([tool, "-w", "-I", hook, "1", "-j", chain])
            if inserted.returncode != 0:
                raise FirewallError(f"{tool}: {inserted.stderr.strip()}")


def bridge_chain(chain: str) -> str:
    """The chain of the Docker workspace networks' bridges."""
    return f"{chain}-BRIDGE"


def bridge_rules(chain: str, prefix: str, ports: Iterable[int], *, ipv6: bool = False) -> list[str]:
    """``bridge_chain``'s rules in ``iptables -S`` form: from a workspace bridge, replies and the
    registry ports on a host address; everything else is refused."""
    unreachable = "icmp6-port-unreachable" if ipv6 else "icmp-port-unreachable"
    name = bridge_chain(chain)
    iface = f"-i {prefix}+"
    local = "-m addrtype --dst-type LOCAL"
    return [
        f"-A {name} {iface} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        *(
            f"-A {name} {iface} -p tcp {local} -m tcp --dport {port} -j RETURN"
            for port in sorted(set(ports))
        ),
        f"-A {name} {iface} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {name} {iface} -j REJECT --reject-with {unreachable}",
    ]


def bridge_ports(listed: str, chain: str, prefix: str) -> set[int]:
    """The registry ports an installed bridge chain (``iptables -S`` output) lets through."""
    pattern = re.compile(
        rf"^-A {re.escape(bridge_chain(chain))} -i {re.escape(prefix)}\+ -p tcp .*"
        r"--dport (\d+) -j RETURN$"
    )
    return {int(match[1]) for line in listed.splitlines() if (match := pattern.match(line))}


def ensure_bridge_firewall(port: int) -> None:
    """Install (or confirm) the rules for Docker workspace bridges, letting TCP ``port`` (the one
    agents call the platform on) through to the host's addresses. Raises ``FirewallError``.

    Ports only accumulate: the ports already in the chain are kept, so platform processes of one
    host that disagree (a port changed by a deploy while older workers run) never take away the
    one another's agents call; the chain is rebuilt from scratch by deleting it
    (``iptables -F/-X``) when a port is retired. Processes of the host serialise on a lock file.
    """
    chain = settings.WORKSPACE_FIREWALL_CHAIN
    prefix = settings.DOCKER_BRIDGE_PREFIX
    key = ("bridge", chain, prefix, str(port))
    with _lock:
        if key in _installed:
            return
        name = bridge_chain(chain)
        lock_path = Path(tempfile.gettempdir()) / f"{name}.lock"
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            for tool in ("iptables", "ip6tables"):
                current = run([tool, "-w", "-S", name])
                ports = (
                    bridge_ports(current.stdout, chain, prefix)
                    if current.returncode == 0
                    else set()
                )
                rules = bridge_rules(chain, prefix, ports | {port}, ipv6=tool == "ip6tables")
                _ensure_chain(tool, name, rules, ("INPUT", "FORWARD"))
        _installed.add(key)
