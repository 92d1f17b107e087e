"""The process backend's network boundary on this host: what its workspaces may reach of it.

The workspace uids, in an nftables table of the platform's (``inet``, named
``WORKSPACE_FIREWALL_CHAIN``; IPv4 and IPv6 alike) whose ``output`` chain polices sockets owned
by a uid of ``WORKSPACE_UID_RANGE`` whose destination is one of the host's own addresses
(``fib daddr type local``: loopback, every interface address, the Docker bridges' gateways): it
lets through replies of connections someone else opened and new TCP connections to the registry
port (``WORKSPACE_REGISTRY_PORT``, else the port of ``PLATFORM_URL``), and rejects everything
else: PostgreSQL, Redis, the engine's TCP socket, another workspace's ports. Other uids (the
platform, the proxy) are not matched.

One exception per workspace: its uid may connect to its own app port (the agent checks that its app
answers before it registers, and at every heartbeat). The chain looks the uid up in a verdict map
(``uids``) that sends each uid of a workspace not removed to a chain of its own (``u<uid>``)
holding that one ``accept``. ``allow_own_app`` writes the uid's chain whole when a workspace starts
(flushed and refilled in one transaction, so any older port of that uid goes with it),
``revoke_own_app`` takes the chain and its map entry out on removal, before the uid and the port
can be handed to another workspace. Both run in the worker's own process through libnftables
(``nft_run_cmd_from_buffer``: one netlink transaction, all of it or nothing): no program is started
per workspace. libnftables reads the chains on the host before it adds a rule, so a start's cost
follows the number of chains (0.19 ms of CPU with up to 100, 0.93 ms with 1,000); taking a removed
workspace's chain out keeps that number at the workspaces not removed. Rebuilding the main chain
(once per process, in one transaction) never touches the uids' chains, so running workspaces keep
their rule. An earlier version's ``iptables`` chains of the same name are taken out when a process
first installs the table.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import urlparse

from django.conf import settings

from provisioning.backends import nft
from provisioning.backends.netfilter import FirewallError, restore, run
from provisioning.backends.process_launch import system_program

_installed: set[tuple[str, ...]] = set()
_lock = threading.Lock()


def registry_port() -> int:
    """``WORKSPACE_REGISTRY_PORT``, else the port of ``PLATFORM_URL``."""
    if settings.WORKSPACE_REGISTRY_PORT:
        return int(settings.WORKSPACE_REGISTRY_PORT)
    parsed = urlparse(settings.PLATFORM_URL)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


# The table's names: what nft accepts as an identifier, and no more.
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _uids_map(table: str) -> str:
    """The verdict map from a workspace uid to its chain (idempotent: ``add`` of what exists)."""
    return f"add map inet {table} uids {{ type uid : verdict ; }}"


def table_commands(table: str, uids: tuple[int, int], port: int) -> str:
    """The table, its map and its main chain's rules as one nft transaction (the chain flushed
    and refilled; the uids' chains and the map's elements are left alone)."""
    return "\n".join(
        [
            f"add table inet {table}",
            _uids_map(table),
            f"add chain inet {table} output "
            "{ type filter hook output priority filter ; policy accept ; }",
            f"flush chain inet {table} output",
            *(
                f"add rule inet {table} output {rule}"
                for rule in (
                    f"meta skuid != {uids[0]}-{uids[1]} return",
                    "fib daddr type != local return",
                    "ct state established,related return",
                    f"tcp dport {port} return",
                    "meta skuid vmap @uids",
                    "meta l4proto tcp reject with tcp reset",
                    "reject",
                )
            ),
        ]
    )


def _nft(commands: str) -> str:
    try:
        return nft.run(commands)
    except nft.NftError as exc:
        raise FirewallError(f"nft: {exc}") from exc


def uid_chain(uid: int) -> str:
    """The nft chain of one workspace uid's exception (its own app port)."""
    return f"u{uid}"


def _table(name: str | None = None) -> str:
    """``name`` (else ``WORKSPACE_FIREWALL_CHAIN``) once checked to be an nft identifier: it goes
    into nft commands as it is."""
    table = str(settings.WORKSPACE_FIREWALL_CHAIN if name is None else name)
    if not _TABLE_NAME.match(table):
        raise FirewallError(
            f"WORKSPACE_FIREWALL_CHAIN={table!r} cannot name the nftables table (a letter, then "
            "up to 63 letters, digits, '_' or '-')"
        )
    return table


def ensure_workspace_firewall() -> None:
    """Install (or confirm) the rules for the configured uid range and registry port. Raises
    ``FirewallError`` saying what failed; the caller refuses to run workspaces then."""
    table = _table()
    uids = tuple(settings.WORKSPACE_UID_RANGE)
    port = registry_port()
    key = (table, str(uids), str(port))
    with _lock:
        if key in _installed:
            return
        _remove_iptables_chains(table)  # an earlier version's, if any
        _nft(table_commands(table, (uids[0], uids[1]), port))
        _installed.add(key)


def allow_own_app(uid: int, port: int) -> None:
    """Let workspace uid ``uid`` reach its own app port ``port`` on the host's addresses, and
    nothing else it did not have; any older port of that uid goes in the same transaction.
    Idempotent."""
    ensure_workspace_firewall()
    table, own = _table(), uid_chain(uid)
    with _lock:
        _nft(
            f"add chain inet {table} {own}\n"
            f"flush chain inet {table} {own}\n"
            f"add rule inet {table} {own} tcp dport {port} accept\n"
            f"add element inet {table} uids {{ {uid} : jump {own} }}"
        )


def revoke_own_app(uid: int) -> None:
    """Take workspace uid ``uid``'s chain and its map entry out (the workspace is removed): the
    uid reaches no app port until a workspace that holds it starts, and the table keeps chains
    only for workspaces not removed (what a start costs follows them; see the module's
    docstring). Each command makes sure of what the next one takes out, so the transaction holds
    whether or not the uid ever ran."""
    table, own = _table(), uid_chain(uid)
    with _lock:
        _nft(
            "\n".join(
                (
                    f"add table inet {table}",
                    _uids_map(table),
                    f"add chain inet {table} {own}",
                    f"flush chain inet {table} {own}",
                    f"add element inet {table} uids {{ {uid} : jump {own} }}",
                    f"delete element inet {table} uids {{ {uid} }}",
                    f"delete chain inet {table} {own}",
                )
            )
        )


def remove_workspace_firewall(chain: str) -> None:
    """Take the process backend's table out, with every uid's chain (an operator retiring a
    platform, a benchmark that ran one of its own), and an earlier version's ``iptables`` chains
    of that name. Raises ``FirewallError``."""
    table = _table(chain)
    with _lock:
        _nft(f"add table inet {table}\ndelete table inet {table}")
        _remove_iptables_chains(chain)
        _installed.clear()


def _remove_iptables_chains(chain: str) -> None:
    """What an earlier version kept in iptables and ip6tables for the process backend: the jump
    from ``OUTPUT``, the main chain, its sub-chain (``<chain>-APPS``) and every uid's chain
    (``<chain>-U<uid>``). The Docker bridges' chain (``<chain>-BRIDGE``) stays."""
    names = re.compile(rf"^-N ({re.escape(chain)}(?:-APPS|-U\d+)?)$")
    for tool in ("iptables", "ip6tables"):
        if system_program(tool) is None:
            continue
        listed = run([tool, "-w", "-S"]).stdout.splitlines()
        found = [match[1] for line in listed if (match := names.match(line))]
        if not found:
            continue
        while run([tool, "-w", "-D", "OUTPUT", "-j", chain]).returncode == 0:
            pass
        lines = [f"-F {name}" for name in found] + [f"-X {name}" for name in found]
        done = restore(tool, lines)
        if done.returncode != 0:
            raise FirewallError(f"{tool}-restore: {done.stderr.strip()}")
