"""The process backend's network boundary: what workspace uids may reach on this host.

One chain of the platform's (``WORKSPACE_FIREWALL_CHAIN``), in iptables and ip6tables alike,
jumped to from ``OUTPUT``. For sockets owned by a uid of ``WORKSPACE_UID_RANGE`` whose destination
is one of the host's own addresses (``addrtype LOCAL``: loopback, every interface address, the
Docker bridges' gateways), it lets through replies of connections someone else opened and new TCP
connections to the registry port (``WORKSPACE_REGISTRY_PORT``, else the port of
``PLATFORM_URL``), and rejects everything else: PostgreSQL, Redis, the engine's TCP socket,
another workspace's ports. Other uids (the platform,
the proxy) are not matched.

One exception per workspace, through a sub-chain (``<chain>-APPS``) the main chain jumps to before
it rejects: a workspace's uid may connect to its own app port (the agent checks that its app
answers before it registers, and at every heartbeat). Each uid that ever ran has one jump there
(``-m owner --uid-owner <uid> -j <chain>-U<uid>``) to a chain of its own holding that one
``ACCEPT``. ``allow_own_app`` writes the uid's chain whole when a workspace starts, in one
``iptables-restore --noflush`` per family (declaring a chain there empties it, so any older rule
of that uid goes in the same transaction; a uid new to the host gets its jump in it too): two
programs per start, where listing the sub-chain and appending took four. Each process reads the
sub-chain once, to know the jumps already there. ``revoke_own_app`` empties the uid's chain on
removal, before the uid and the port can be handed to another workspace. Rebuilding the main
chain never touches these, so running workspaces keep their rule.

The Docker backend's bridges, in a chain of their own (``<chain>-BRIDGE``) jumped to from
``INPUT`` and ``FORWARD``: a workspace network's bridge is named ``DOCKER_BRIDGE_PREFIX`` + part
of the workspace id, so one interface wildcard (``-i wsbr+``) matches every workspace network.
A packet that comes in from a workspace network may start a TCP connection to a registry port
on a host address (the agent calling the platform at its gateway) and nothing else: not
PostgreSQL or Redis listening on every address, not sshd, not the engine's TCP socket, not a
route out. Replies to connections the host opened (the proxy reaching a workspace's app) pass.

Each chain is rebuilt in one ``iptables-restore --noflush`` transaction, so there is no moment
with a half-written chain, and only when it differs from what is wanted (idempotent, cheap).
"""

from __future__ import annotations

import fcntl
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings

from provisioning.backends.process_launch import system_program

_installed: set[tuple[str, ...]] = set()
_lock = threading.Lock()


class FirewallError(Exception):
    pass


def registry_port() -> int:
    """``WORKSPACE_REGISTRY_PORT``, else the port of ``PLATFORM_URL``."""
    if settings.WORKSPACE_REGISTRY_PORT:
        return int(settings.WORKSPACE_REGISTRY_PORT)
    parsed = urlparse(settings.PLATFORM_URL)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def chain_rules(chain: str, uids: tuple[int, int], port: int, *, ipv6: bool = False) -> list[str]:
    """The chain's rules in ``iptables -S`` form (what the check compares against)."""
    unreachable = "icmp6-port-unreachable" if ipv6 else "icmp-port-unreachable"
    owner = f"-m owner --uid-owner {uids[0]}-{uids[1]}"
    local = "-m addrtype --dst-type LOCAL"
    return [
        f"-A {chain} {owner} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {chain} -p tcp {owner} {local} -m tcp --dport {port} -j RETURN",
        f"-A {chain} -j {apps_chain(chain)}",
        f"-A {chain} -p tcp {owner} {local} -j REJECT --reject-with tcp-reset",
        f"-A {chain} {owner} {local} -j REJECT --reject-with {unreachable}",
    ]


def apps_chain(chain: str) -> str:
    """The sub-chain of per-workspace rules (a workspace's uid to its own app port)."""
    return f"{chain}-APPS"


def uid_chain(chain: str, uid: int) -> str:
    """The chain of one workspace uid's exception (its own app port)."""
    return f"{chain}-U{uid}"


# iptables' limit on a chain's name (XT_EXTENSION_MAXNAMELEN less its NUL).
CHAIN_NAME_MAX = 28


def _uid_jump(chain: str, uid: int) -> str:
    return f"{apps_chain(chain)} -m owner --uid-owner {uid} -j {uid_chain(chain, uid)}"


def _restore(tool: str, lines: list[str]) -> subprocess.CompletedProcess[str]:
    """One ``<tool>-restore --noflush`` transaction of the filter table: all of it or nothing."""
    script = "\n".join(["*filter", *lines, "COMMIT", ""])
    return _run([f"{tool}-restore", "-w", "--noflush"], script)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a firewall tool by its absolute path on the system's PATH (it runs as root);
    ``FirewallError`` naming it when it is not installed."""
    program = system_program(argv[0])
    if program is None:
        raise FirewallError(f"{argv[0]} is not installed (apt-get install iptables)")
    try:
        return subprocess.run(
            [program, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"{argv[0]}: {exc}") from exc


def _ensure_chain(tool: str, chain: str, rules: list[str], hooks: tuple[str, ...]) -> None:
    """Make ``chain`` hold exactly ``rules`` and be jumped to first from each of ``hooks``."""
    current = _run([tool, "-w", "-S", chain])
    wanted = [f"-N {chain}", *rules]
    if current.returncode != 0 or current.stdout.splitlines() != wanted:
        script = "\n".join(["*filter", f":{chain} - [0:0]", *rules, "COMMIT", ""])
        restored = _run([f"{tool}-restore", "-w", "--noflush"], script)
        if restored.returncode != 0:
            raise FirewallError(f"{tool}-restore: {restored.stderr.strip()}")
    for hook in hooks:
        if _run([tool, "-w", "-C", hook, "-j", chain]).returncode != 0:
            inserted = _run([tool, "-w", "-I", hook, "1", "-j", chain])
            if inserted.returncode != 0:
                raise FirewallError(f"{tool}: {inserted.stderr.strip()}")


def _ensure_family(tool: str, chain: str, rules: list[str]) -> None:
    # The sub-chain must exist before the main chain jumps to it; its rules are left alone.
    if _run([tool, "-w", "-S", apps_chain(chain)]).returncode != 0:
        _run([tool, "-w", "-N", apps_chain(chain)])
    _ensure_chain(tool, chain, rules, ("OUTPUT",))


def ensure_workspace_firewall() -> None:
    """Install (or confirm) the rules for the configured uid range and registry port. Raises
    ``FirewallError`` saying what failed; the caller refuses to run workspaces then."""
    chain = settings.WORKSPACE_FIREWALL_CHAIN
    uids = tuple(settings.WORKSPACE_UID_RANGE)
    port = registry_port()
    key = (chain, str(uids), str(port))
    with _lock:
        if key in _installed:
            return
        longest = uid_chain(chain, max(uids))
        if len(longest) > CHAIN_NAME_MAX:
            raise FirewallError(
                f"WORKSPACE_FIREWALL_CHAIN={chain!r} is too long: a uid's chain ({longest}) would "
                f"pass iptables' {CHAIN_NAME_MAX} characters"
            )
        for tool in ("iptables", "ip6tables"):
            rules = chain_rules(chain, (uids[0], uids[1]), port, ipv6=tool == "ip6tables")
            _ensure_family(tool, chain, rules)
            _tidy_apps_chain(tool, chain)
        _installed.add(key)


def _tidy_apps_chain(tool: str, chain: str) -> None:
    """Read the sub-chain once per process: its uids' jumps are remembered (a start then rewrites
    the uid's chain alone); a second jump of one uid (two processes that both added it) and any
    rule that is not a jump (the per-uid rules an earlier version wrote there directly, which
    nothing would revoke any more) go."""
    listed = _run([tool, "-w", "-S", apps_chain(chain)])
    jump = re.compile(
        rf"^-A {re.escape(apps_chain(chain))} -m owner --uid-owner (\d+) "
        rf"-j {re.escape(chain)}-U\1$"
    )
    seen: set[int] = set()
    for line in listed.stdout.splitlines():
        if not line.startswith("-A "):
            continue
        match = jump.match(line)
        if match and int(match[1]) not in seen:
            seen.add(int(match[1]))
            _jumps.add((tool, chain, int(match[1])))
        else:
            _run([tool, "-w", "-D", *line.split()[1:]])


# (tool, chain, uid) whose jump is in the sub-chain, as this process knows it: read when it first
# installs the chain, then every jump it adds.
_jumps: set[tuple[str, str, int]] = set()


def allow_own_app(uid: int, port: int) -> None:
    """Let workspace uid ``uid`` reach its own app port ``port`` on the host's addresses, and
    nothing else it did not have; any older rule of that uid (another port) goes in the same
    transaction. One ``-restore`` per family. Idempotent."""
    ensure_workspace_firewall()
    chain = settings.WORKSPACE_FIREWALL_CHAIN
    own = uid_chain(chain, uid)
    rule = [
        f":{own} - [0:0]",
        f"-A {own} -p tcp -m addrtype --dst-type LOCAL -m tcp --dport {port} -j ACCEPT",
    ]
    with _lock:
        for tool in ("iptables", "ip6tables"):
            known = (tool, chain, uid) in _jumps
            # A uid new to this host since the sub-chain was read gets its jump in the same
            # transaction. (Were another process to add it meanwhile, the second jump would only
            # repeat the first; the next process to read the sub-chain drops it.)
            done = _restore(tool, rule if known else [*rule, f"-A {_uid_jump(chain, uid)}"])
            if done.returncode != 0:
                raise FirewallError(f"{tool}-restore: {done.stderr.strip()}")
            _jumps.add((tool, chain, uid))


def revoke_own_app(uid: int) -> None:
    """Empty workspace uid ``uid``'s chain (the workspace is removed): the uid reaches no app
    port until a workspace that holds it starts."""
    chain = settings.WORKSPACE_FIREWALL_CHAIN
    with _lock:
        for tool in ("iptables", "ip6tables"):
            if system_program(tool) is None:
                continue
            done = _restore(tool, [f":{uid_chain(chain, uid)} - [0:0]"])
            if done.returncode != 0:
                raise FirewallError(f"{tool}-restore: {done.stderr.strip()}")


def remove_workspace_firewall(chain: str) -> None:
    """Take the process backend's chains out of both families: the jump from ``OUTPUT``, the main
    chain, its sub-chain and every uid's chain (an operator retiring a platform, a benchmark
    that ran one of its own). Raises ``FirewallError``."""
    uid_chains = re.compile(rf"^-N ({re.escape(chain)}-U\d+)$")
    with _lock:
        for tool in ("iptables", "ip6tables"):
            if system_program(tool) is None:
                continue
            while _run([tool, "-w", "-D", "OUTPUT", "-j", chain]).returncode == 0:
                pass
            listed = _run([tool, "-w", "-S"]).stdout.splitlines()
            present = {line.split()[1] for line in listed if line.startswith("-N ")}
            names = [name for name in (chain, apps_chain(chain)) if name in present]
            names += [match[1] for line in listed if (match := uid_chains.match(line))]
            if names:
                lines = [f"-F {name}" for name in names] + [f"-X {name}" for name in names]
                done = _restore(tool, lines)
                if done.returncode != 0:
                    raise FirewallError(f"{tool}-restore: {done.stderr.strip()}")
        _installed.clear()
        _jumps.clear()


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
                current = _run([tool, "-w", "-S", name])
                ports = (
                    bridge_ports(current.stdout, chain, prefix)
                    if current.returncode == 0
                    else set()
                )
                rules = bridge_rules(chain, prefix, ports | {port}, ipv6=tool == "ip6tables")
                _ensure_chain(tool, name, rules, ("INPUT", "FORWARD"))
        _installed.add(key)
