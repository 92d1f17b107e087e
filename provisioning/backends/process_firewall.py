"""The host side of the process backend's links: what comes in from a workspace's link.

Each workspace runs in a network namespace of its own whose one way out is its veth link to the
host (``process_network``). This module keeps the host's side of those links small: an nftables
table of the platform's (``inet``, named ``WORKSPACE_FIREWALL_CHAIN``) whose ``input`` and
``forward`` chains police packets that arrive on a link (an interface named
``PROCESS_LINK_PREFIX``* with a source in ``PROCESS_LINK_SUBNET``): to one of the host's own
addresses, replies of connections the host opened (the proxy reaching an app) and new TCP
connections to the registry port (``WORKSPACE_REGISTRY_PORT``, else the port of ``PLATFORM_URL``)
pass; everything else is refused, and nothing from a link is forwarded (not to another workspace,
not out of the host). Everything else the host has (abstract Unix sockets, the sockets under
``/run``, loopback's services) is out of a workspace's reach because it is not in its namespaces,
not because a rule names it.

The source check keeps two platforms of one host (their tables named differently, their subnets
apart) from policing each other's links when one's prefix is the start of the other's. The table
is written in one netlink transaction through libnftables (``nft``), once per process; an
earlier version's table of that name (which policed workspace uids on ``output``) is replaced
whole, and its ``iptables`` chains are taken out.
"""

from __future__ import annotations

import ipaddress
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


def table_commands(table: str, prefix: str, subnet: str, port: int) -> str:
    """The whole table as one nft transaction: made (or an older one of that name replaced) with
    its ``input`` and ``forward`` chains."""
    network = ipaddress.IPv4Network(subnet)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
        raise FirewallError(f"{prefix!r} cannot name the links' interfaces")
    from_link = [f'iifname != "{prefix}*" return', f"ip saddr != {network} return"]
    chains = {
        "input": [
            *from_link,
            "ct state established,related return",
            f"fib daddr type local tcp dport {port} return",
            "meta l4proto tcp reject with tcp reset",
            "reject",
        ],
        "forward": [*from_link, "meta l4proto tcp reject with tcp reset", "reject"],
    }
    lines = [f"add table inet {table}", f"delete table inet {table}", f"add table inet {table}"]
    for chain, rules in chains.items():
        lines.append(
            f"add chain inet {table} {chain} "
            f"{{ type filter hook {chain} priority filter ; policy accept ; }}"
        )
        lines.extend(f"add rule inet {table} {chain} {rule}" for rule in rules)
    return "\n".join(lines)


def _nft(commands: str) -> str:
    try:
        return nft.run(commands)
    except nft.NftError as exc:
        raise FirewallError(f"nft: {exc}") from exc


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
    """Install (or confirm) the links' rules for the configured prefix, subnet and registry
    port. Raises ``FirewallError`` saying what failed; the caller refuses to run workspaces
    then."""
    table = _table()
    prefix, subnet = settings.PROCESS_LINK_PREFIX, settings.PROCESS_LINK_SUBNET
    port = registry_port()
    key = (table, prefix, subnet, str(port))
    with _lock:
        if key in _installed:
            return
        _remove_iptables_chains(table)  # an earlier version's, if any
        _nft(table_commands(table, prefix, subnet, port))
        _installed.add(key)


def remove_workspace_firewall(chain: str) -> None:
    """Take the process backend's table out (an operator retiring a platform, a benchmark that
    ran one of its own), and an earlier version's ``iptables`` chains of that name. Raises
    ``FirewallError``."""
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
