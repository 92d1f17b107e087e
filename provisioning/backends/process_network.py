"""A process workspace's network: a namespace of its own and one veth link to the host.

Under uid isolation the launch chain runs ``unshare --net``: the workspace's processes start in
a network namespace holding only ``lo``, with its own loopback addresses and its own abstract
Unix sockets. Before the instance runs, the worker gives that namespace its link
(``veth.wire_process``): a veth pair whose host end is named like a Docker workspace's link
(``PROCESS_LINK_PREFIX`` + the start of the id) and whose two ends share the /31 of
``PROCESS_LINK_SUBNET`` that the workspace's uid picks (its offset in ``WORKSPACE_UID_RANGE``,
unique among live workspaces). The even address is the host's end: the workspace's gateway,
where ``PLATFORM_URL`` points inside it and where the registry listener answers. The odd one is
the workspace's: where its app listens and the proxy reaches it. ``process_firewall`` lets in
from a link only the registry port and replies.

The link lives and dies with the namespace: when the workspace's last process ends the kernel
deletes the pair, so a crash leaves nothing behind for long. A host end still there when the
workspace starts again (the kernel tears a namespace down a moment later) is replaced, and
``remove`` deletes it by name (absent means done).
"""

from __future__ import annotations

from uuid import UUID

from django.conf import settings

from provisioning.backends import veth
from provisioning.backends.base import BackendError


def link_name(workspace_id: UUID | str) -> str:
    """The host end of the workspace's link: ``PROCESS_LINK_PREFIX`` and the start of the id,
    15 characters (the kernel's limit)."""
    prefix = settings.PROCESS_LINK_PREFIX
    return prefix + str(workspace_id).replace("-", "")[: 15 - len(prefix)]


def link(uid: int) -> veth.Pair:
    """The addresses of the link of the workspace that holds ``uid``."""
    low, high = settings.WORKSPACE_UID_RANGE
    if not low <= uid <= high:
        raise BackendError(f"uid {uid} is not one of WORKSPACE_UID_RANGE={low}-{high}")
    try:
        return veth.pair(settings.PROCESS_LINK_SUBNET, uid - low)
    except veth.VethError as exc:
        raise BackendError(f"PROCESS_LINK_SUBNET: {exc}") from exc


def wire(pid: int, workspace_id: UUID | str, pair: veth.Pair) -> None:
    """Give the namespace of process ``pid`` (the workspace's monitor) its link."""
    try:
        veth.wire_process(pid, link_name(workspace_id), pair)
    except veth.VethError as exc:
        raise BackendError(f"cannot wire the workspace's link: {exc}") from exc


def unwire(workspace_id: UUID | str) -> None:
    """Delete the host end of the workspace's link (and with it the other end), if it is there."""
    try:
        veth.unwire(link_name(workspace_id))
    except veth.VethError as exc:
        raise BackendError(str(exc)) from exc


def platform_url(url: str, pair: veth.Pair) -> str:
    """``PLATFORM_URL`` as the workspace sees it: the host end of its link, the port kept."""
    return veth.platform_url_via(url, pair.gateway)
