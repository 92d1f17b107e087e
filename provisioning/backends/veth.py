"""A workspace's own network link, made by the platform: one veth pair per container (and per
process workspace: ``wire_process``, ``process_network``).

``DOCKER_NETWORK_MODE=veth`` creates containers with networking disabled (their own network
namespace holding only ``lo``) and wires each one, once it runs, with a veth pair: the host end
is named like a workspace bridge (``DOCKER_BRIDGE_PREFIX`` + the start of the id, so the bridge
firewall's interface wildcard covers it), the container end is ``eth0``. The two ends share a /31
of ``DOCKER_VETH_SUBNET`` picked by the workspace's slot (its isolation uid's offset in
``WORKSPACE_UID_RANGE``, unique among live workspaces): the even address is the host's (the
container's gateway, where it reaches the registry), the odd one the container's (where the proxy
reaches its app). A container has no route but the one to its gateway, and what it sends there is
policed by the bridge firewall: the registry port, nothing else, not another workspace.

Why not a Docker network: on Debian's engine (20.10) every container with a network namespace of
the engine's making runs the ``libnetwork-setkey`` prestart hook, which executes the whole
``dockerd`` binary once more; that hook alone costs more engine CPU than the container's create
and start together (docs/architecture.md, Docker backend). A container with networking disabled
runs no hook, and this module's wiring costs about 1.5 ms of the worker's CPU.

Everything goes through rtnetlink sockets in the worker's process (no ``ip`` program per
workspace). The container's side is configured from a short-lived thread that enters the
container's network namespace (``setns`` moves only the calling thread), so the worker itself
never leaves its own. Needs root (``CAP_NET_ADMIN`` on the host, ``CAP_SYS_ADMIN`` to enter the
namespace) and the engine on this host.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlunparse

# rtnetlink message types and flags (linux/rtnetlink.h, linux/netlink.h).
_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_RTM_NEWADDR = 20
_RTM_NEWROUTE = 24
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_EXCL = 0x200
_NLM_F_CREATE = 0x400
# Link attributes (linux/if_link.h, linux/veth.h).
_IFLA_IFNAME = 3
_IFLA_LINKINFO = 18
_IFLA_NET_NS_FD = 28
_IFLA_INFO_KIND = 1
_IFLA_INFO_DATA = 2
_VETH_INFO_PEER = 1
_IFF_UP = 0x1
# Address and route attributes (linux/if_addr.h, linux/rtnetlink.h).
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_RTA_OIF = 4
_RTA_GATEWAY = 5
_RT_TABLE_MAIN = 254
_RTPROT_BOOT = 3
_RT_SCOPE_UNIVERSE = 0
_RTN_UNICAST = 1
_CLONE_NEWNET = 0x40000000

_CONTAINER_END = "eth0"
_seq_lock = threading.Lock()
_seq = 0


class VethError(Exception):
    """The link could not be made (the message says which step and why)."""


@dataclass(frozen=True)
class Pair:
    """The /31 of one workspace's link: ``gateway`` on the host end, ``address`` in the
    container."""

    gateway: str
    address: str


def pair(subnet: str, slot: int) -> Pair:
    """The ``slot``-th /31 of ``subnet``. Raises ``VethError`` when the subnet has no such /31."""
    network = ipaddress.IPv4Network(subnet)
    if slot < 0 or 2 * slot + 1 >= network.num_addresses:
        raise VethError(
            f"{subnet} has no /31 number {slot} (it holds {network.num_addresses // 2})"
        )
    base = network.network_address + 2 * slot
    return Pair(gateway=str(base), address=str(base + 1))


def check() -> None:
    """Raise ``VethError`` when this process cannot make links (not root)."""
    if os.geteuid() != 0:
        raise VethError(
            "making a workspace's veth link needs root (CAP_NET_ADMIN, and CAP_SYS_ADMIN to "
            "enter the container's network namespace); run the worker as root or set "
            "DOCKER_NETWORK_MODE=workspace"
        )


# -- netlink messages -------------------------------------------------------------------------
def _align(length: int) -> int:
    return (length + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (_align(length) - length)


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    # struct ifinfomsg: family, pad, type, index, flags, change
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def _next_seq() -> int:
    global _seq
    with _seq_lock:
        _seq = (_seq + 1) & 0xFFFFFFFF
        return _seq


class _Netlink:
    """One rtnetlink socket, in the network namespace of the thread that opened it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes) -> int:
        """Send one request and wait for its acknowledgement; returns 0 or the negative errno."""
        seq = _next_seq()
        header = struct.pack(
            "=LHHLL", 16 + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK | flags, seq, 0
        )
        self.sock.send(header + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_type, _flags, msg_seq, _pid = struct.unpack_from("=LHHLL", data, offset)
                if msg_type == _NLMSG_ERROR and msg_seq == seq:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    return int(code)
                offset += _align(max(length, 16))

    def must(self, doing: str, kind: int, flags: int, body: bytes) -> None:
        code = self.request(kind, flags, body)
        if code:
            raise VethError(f"{doing}: {os.strerror(-code)}")

    def link_up(self, index: int, doing: str) -> None:
        self.must(doing, _RTM_NEWLINK, 0, _ifinfo(index, _IFF_UP, _IFF_UP))

    def add_address(self, index: int, address: str, prefix: int, doing: str) -> None:
        packed = socket.inet_aton(address)
        # struct ifaddrmsg: family, prefixlen, flags, scope, index
        body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, _RT_SCOPE_UNIVERSE, index)
        body += _attr(_IFA_LOCAL, packed) + _attr(_IFA_ADDRESS, packed)
        self.must(doing, _RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, body)

    def default_route(self, index: int, gateway: str, doing: str) -> None:
        # struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        body = struct.pack(
            "=BBBBBBBBI",
            socket.AF_INET,
            0,
            0,
            0,
            _RT_TABLE_MAIN,
            _RTPROT_BOOT,
            _RT_SCOPE_UNIVERSE,
            _RTN_UNICAST,
            0,
        )
        body += _attr(_RTA_GATEWAY, socket.inet_aton(gateway)) + _attr(
            _RTA_OIF, struct.pack("=I", index)
        )
        self.must(doing, _RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_EXCL, body)

    def delete_link(self, name: str) -> int:
        return self.request(_RTM_DELLINK, 0, _ifinfo() + _attr(_IFLA_IFNAME, _name(name)))


# -- the link ---------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _in_namespace(fd: int, pair: Pair) -> None:
    """Configure the container's end (run in a thread of its own, which it moves into the
    container's namespace and which then ends)."""
    _setns(fd)
    with _Netlink() as link:
        try:
            index = socket.if_nametoindex(_CONTAINER_END)
            loopback = socket.if_nametoindex("lo")
        except OSError as exc:
            raise VethError(f"the container has no {_CONTAINER_END}: {exc}") from exc
        link.link_up(loopback, "bringing the container's lo up")
        link.add_address(index, pair.address, 31, f"giving {_CONTAINER_END} {pair.address}/31")
        link.link_up(index, f"bringing the container's {_CONTAINER_END} up")
        link.default_route(index, pair.gateway, f"routing the container through {pair.gateway}")


def _namespace_fd(pid: int, container_id: str) -> int:
    """An open fd of the container's network namespace, after checking that ``pid`` is that
    container's process (its cgroup names the container) and not in the host's namespace."""
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as exc:
        raise VethError(f"process {pid} of container {container_id[:12]} is gone: {exc}") from exc
    if container_id not in cgroups:
        raise VethError(
            f"process {pid} is not container {container_id[:12]}'s on this host (is the engine "
            "on another host? DOCKER_NETWORK_MODE=veth needs the engine on the worker's host)"
        )
    return _own_namespace_fd(pid, f"container {container_id[:12]}")


def _own_namespace_fd(pid: int, whose: str) -> int:
    """An open fd of process ``pid``'s network namespace, which must not be the host's."""
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VethError(f"cannot open the network namespace of process {pid}: {exc}") from exc
    own = os.stat("/proc/self/ns/net")
    theirs = os.fstat(fd)
    if (theirs.st_dev, theirs.st_ino) == (own.st_dev, own.st_ino):
        os.close(fd)
        raise VethError(
            f"{whose} shares the host's network namespace; a workspace link goes into a "
            "namespace of its own"
        )
    return fd


def _disable_ipv6(name: str) -> None:
    # The host end carries IPv4 only: no link-local IPv6 address for the container to reach.
    path = Path("/proc/sys/net/ipv6/conf", name, "disable_ipv6")
    if path.exists():
        path.write_text("1")


def wire(pid: int, container_id: str, host_name: str, link_pair: Pair) -> None:
    """Give the running container (process ``pid``) its link: the veth pair ``host_name`` /
    ``eth0``, addresses, routes, both ends up. A host end of that name left from an earlier
    container (its namespace not yet torn down) is replaced. Raises ``VethError``."""
    _wire_fd(_namespace_fd(pid, container_id), host_name, link_pair)


def wire_process(pid: int, host_name: str, link_pair: Pair) -> None:
    """The same for a process of the platform's own that runs in a network namespace of its own
    (the process backend's monitor, made by ``unshare --net``). Raises ``VethError``."""
    _wire_fd(_own_namespace_fd(pid, f"process {pid}"), host_name, link_pair)


def _wire_fd(fd: int, host_name: str, link_pair: Pair) -> None:
    """Make the pair into the namespace open as ``fd`` (closed here, whatever happens)."""
    try:
        with _Netlink() as link:
            peer = _ifinfo() + _attr(_IFLA_IFNAME, _name(_CONTAINER_END))
            peer += _attr(_IFLA_NET_NS_FD, struct.pack("=I", fd))
            info = _attr(_IFLA_INFO_KIND, b"veth") + _attr(
                _IFLA_INFO_DATA, _attr(_VETH_INFO_PEER, peer)
            )
            body = _ifinfo() + _attr(_IFLA_IFNAME, _name(host_name)) + _attr(_IFLA_LINKINFO, info)
            code = link.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)
            if code == -errno.EEXIST:
                link.delete_link(host_name)
                code = link.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)
            if code:
                raise VethError(f"creating the veth pair {host_name}: {os.strerror(-code)}")
            index = socket.if_nametoindex(host_name)
            _disable_ipv6(host_name)
            link.add_address(
                index, link_pair.gateway, 31, f"giving {host_name} {link_pair.gateway}"
            )
            link.link_up(index, f"bringing {host_name} up")
        failure: list[BaseException] = []

        def configure() -> None:
            try:
                _in_namespace(fd, link_pair)
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)

        worker = threading.Thread(target=configure, name=f"veth-{host_name}", daemon=True)
        worker.start()
        worker.join()
        if failure:
            exc = failure[0]
            if isinstance(exc, VethError):
                raise exc
            raise VethError(f"configuring the container's end: {exc}") from exc
    finally:
        os.close(fd)


def unwire(host_name: str) -> None:
    """Delete the host end (and with it the container's end), if it is there."""
    with _Netlink() as link:
        code = link.delete_link(host_name)
    if code and code != -errno.ENODEV:
        raise VethError(f"deleting {host_name}: {os.strerror(-code)}")


def platform_url_via(url: str, gateway: str) -> str:
    """PLATFORM_URL as a workspace behind a link (or on a network) sees it: the host part
    replaced by its gateway (the host's address on the link), the port and path kept."""
    parsed = urlparse(url)
    port = f":{parsed.port}" if parsed.port else ""
    host = f"[{gateway}]" if ":" in gateway else gateway
    return urlunparse(parsed._replace(netloc=f"{host}{port}"))
