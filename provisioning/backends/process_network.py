"""A process workspace's network: a namespace of its own and one veth link to the host.

Under uid isolation the launch chain runs ``unshare --net``: the workspace's processes start in
a network namespace holding only ``lo``, with its own loopback addresses and its own abstract
Unix sockets. Before the instance runs, the worker gives that namespace its link
(``veth.wire_process``): a veth pair whose host end is named by the workspace's uid
(``PROCESS_LINK_PREFIX`` + the uid) and whose two ends share the /31 of ``PROCESS_LINK_SUBNET``
that the uid picks (its offset in ``WORKSPACE_UID_RANGE``, unique among live workspaces). The
even address is the host's end: the workspace's gateway, where ``PLATFORM_URL`` points inside it
and where the registry listener answers. The odd one is the workspace's: where its app listens
and the proxy reaches it. ``process_firewall`` lets in from a link only the registry port and
replies.

Named by the uid, as its addresses are: whatever holds the uid's link (an earlier cycle killed
mid-launch, a redelivered one, a workspace that held the uid before) is found by that name and
replaced, never left to answer for the addresses of the new one. The link lives and dies with the
namespace: when the workspace's last process ends the kernel deletes the pair a moment later; a
start replaces a host end still there, and a stop deletes it by name (absent means done).
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from provisioning.backends import veth
from provisioning.backends.base import BackendError


def link_name(uid: int) -> str:
    """The host end of the link of the workspace that holds ``uid``: ``PROCESS_LINK_PREFIX`` and
    the uid (settings check that it fits the kernel's 15 characters)."""
    return f"{settings.PROCESS_LINK_PREFIX}{uid}"


def link_exists(uid: int) -> bool:
    """Whether the host end of ``uid``'s link is there (the worker's namespace is the host's)."""
    return Path("/sys/class/net", link_name(uid)).exists()


def link(uid: int) -> veth.Pair:
    """The addresses of the link of the workspace that holds ``uid``."""
    low, high = settings.WORKSPACE_UID_RANGE
    if not low <= uid <= high:
        raise BackendError(f"uid {uid} is not one of WORKSPACE_UID_RANGE={low}-{high}")
    try:
        return veth.pair(settings.PROCESS_LINK_SUBNET, uid - low)
    except veth.VethError as exc:
        raise BackendError(f"PROCESS_LINK_SUBNET: {exc}") from exc


def wire(pid: int, name: str, pair: veth.Pair) -> None:
    """Give the namespace of process ``pid`` (the workspace's monitor) its link ``name``,
    replacing whatever holds that name."""
    try:
        veth.wire_process(pid, name, pair)
    except veth.VethError as exc:
        raise BackendError(f"cannot wire the workspace's link: {exc}") from exc


def unwire(name: str) -> None:
    """Delete the host end of link ``name`` (and with it the other end), if it is there."""
    try:
        veth.unwire(name)
    except veth.VethError as exc:
        raise BackendError(str(exc)) from exc


def platform_url(url: str, pair: veth.Pair) -> str:
    """``PLATFORM_URL`` as the workspace sees it: the host end of its link, the port kept."""
    return veth.platform_url_via(url, pair.gateway)
