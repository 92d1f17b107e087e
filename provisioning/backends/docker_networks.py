"""Where a Docker workspace's container sits on the network, and what it may reach
(``DOCKER_NETWORK_MODE``).

With ``veth`` (the default) a container is created with networking disabled and, once it runs,
given a link of its own to the host (``veth.wire``: a veth pair whose host end is named
``DOCKER_BRIDGE_PREFIX`` + the id's start, a /31 of ``DOCKER_VETH_SUBNET`` picked by the
workspace's isolation uid). With ``workspace`` each workspace gets its own internal bridge network
``ws-<id>-net`` (labelled like the container, removed with it and by orphan removal), its bridge
named the same way. Either way workspaces cannot reach one another nor anything outside the host;
of the host, only the registry listener's port at the workspace's gateway address
(``PLATFORM_URL``'s host is replaced by the gateway): the host firewall
(``docker_firewall``, ``DOCKER_HOST_FIREWALL``) refuses everything else that comes in from such an
interface, so a service listening on all the host's addresses is not reachable either.
``DOCKER_NETWORK_MODE=host`` is the documented opt-out: the host's network, the app on loopback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from uuid import UUID

import docker
import docker.errors
from django.conf import settings
from docker.models.containers import Container

from provisioning.backends import docker_firewall, veth
from provisioning.backends.base import BackendError, LaunchSpec, State
from provisioning.backends.engine import container_name, engine_errors, labelled, labels
from provisioning.backends.veth import platform_url_via

logger = logging.getLogger(__name__)

# The bridge driver's option naming the network's Linux bridge.
BRIDGE_OPTION = "com.docker.network.bridge.name"
_CREATE_ATTEMPTS = 3
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def network_name(workspace_id: UUID | str) -> str:
    return f"{container_name(workspace_id)}-net"


def bridge_name(workspace_id: UUID | str) -> str:
    """The Linux bridge of the workspace's network (veth: the host end of its link):
    ``DOCKER_BRIDGE_PREFIX`` and the start of the id, 15 characters (the kernel's limit),
    matched by the host firewall's wildcard."""
    prefix = settings.DOCKER_BRIDGE_PREFIX
    return prefix + str(workspace_id).replace("-", "")[: 15 - len(prefix)]


def own_network() -> bool:
    """Whether each workspace gets an internal network of its own (``workspace`` mode)."""
    return bool(settings.DOCKER_NETWORK_MODE == "workspace")


def wired() -> bool:
    """Whether containers get a veth link of the platform's making (``veth`` mode)."""
    return bool(settings.DOCKER_NETWORK_MODE == "veth")


def unavailable_reason() -> str | None:
    """Why this host cannot wire containers (``veth`` mode: not root, no engine here); None
    when it can, or when the mode needs no wiring."""
    if not wired():
        return None
    try:
        veth.check()
    except veth.VethError as exc:
        return f"DOCKER_NETWORK_MODE=veth: {exc}"
    return None


# -- veth links --------------------------------------------------------------------------------
def link(spec: LaunchSpec) -> veth.Pair:
    """The addresses of the workspace's link: the /31 its isolation uid's offset picks."""
    low, high = settings.WORKSPACE_UID_RANGE
    if spec.uid is None or not low <= spec.uid <= high:
        raise BackendError(
            f"docker: DOCKER_NETWORK_MODE=veth picks a workspace's addresses by its isolation "
            f"uid, and {spec.uid} is not one of WORKSPACE_UID_RANGE={low}-{high}"
        )
    return veth.pair(settings.DOCKER_VETH_SUBNET, spec.uid - low)


def wire(container: Container, spec: LaunchSpec) -> veth.Pair:
    """Give the running container its link to the host; returns the link's addresses."""
    pair = link(spec)
    pid = int(container.attrs.get("State", {}).get("Pid") or 0)
    try:
        veth.wire(pid, str(container.id), bridge_name(spec.workspace_id), pair)
    except veth.VethError as exc:
        raise BackendError(f"docker: cannot wire container {spec.name}: {exc}") from exc
    return pair


def unwire(workspace_id: UUID | str) -> None:
    """Delete the host end of the workspace's link, if it outlived its container (the
    kernel deletes a pair with the container's namespace, not always at once)."""
    if not wired():
        return
    try:
        veth.unwire(bridge_name(workspace_id))
    except veth.VethError as exc:
        raise BackendError(f"docker: {exc}") from exc


# -- workspace networks ------------------------------------------------------------------------
def ensure_network(client: docker.DockerClient, spec: LaunchSpec, *, known: bool) -> dict[str, Any]:
    """Get or create the workspace's internal network; returns its engine attributes. One
    engine call when an earlier instance used it (``known``: inspected by name), two on a
    first provision (created, then inspected; the engine refuses a duplicate name: 409)."""
    name = network_name(spec.workspace_id)
    if known:
        with engine_errors(f"inspecting network {name}"):
            try:
                attrs = dict(client.api.inspect_network(name))
            except docker.errors.NotFound:
                attrs = {}
        mine = attrs.get("Labels") or {}
        if attrs.get("Name") == name and all(
            mine.get(key) == value for key, value in labels(spec.workspace_id).items()
        ):
            return attrs
    for _attempt in range(_CREATE_ATTEMPTS):
        with engine_errors(f"creating network {name}"):
            try:
                created = client.api.create_network(
                    name,
                    driver="bridge",
                    internal=True,
                    options={BRIDGE_OPTION: bridge_name(spec.workspace_id)},
                    labels=labels(spec.workspace_id),
                    check_duplicate=True,
                )
                return dict(client.api.inspect_network(created["Id"]))
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
        # An earlier cycle's (or a racing cycle's) network of that name.
        with engine_errors(f"listing networks for {name}"):
            found = client.api.networks(names=[name], filters=labelled(spec.workspace_id))
        for network in found:
            if network.get("Name") == name:
                with engine_errors(f"inspecting network {name}"):
                    try:
                        return dict(client.api.inspect_network(network["Id"]))
                    except docker.errors.NotFound:
                        break  # removed meanwhile: create again
    raise BackendError(f"docker: could not create network {name}")


def remove_networks(client: docker.DockerClient, workspace_id: UUID | str) -> None:
    with engine_errors(f"listing the networks of {workspace_id}"):
        networks = client.api.networks(filters=labelled(workspace_id))
    for network in networks:
        with (
            engine_errors(f"removing network {network.get('Name')}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            client.api.remove_network(network["Id"])


def gateway(network: Mapping[str, Any]) -> str:
    for config in (network.get("IPAM") or {}).get("Config") or []:
        if config.get("Gateway"):
            return str(config["Gateway"])
    raise BackendError(
        f"docker: network {network.get('Name')} has no gateway address; the agent could not "
        "reach the platform"
    )


# -- the host firewall -------------------------------------------------------------------------
def ensure_bridge_firewall(network: Mapping[str, Any], platform_url: str) -> None:
    """Confirm the host firewall covers the workspace's bridge (``DOCKER_HOST_FIREWALL``):
    from the bridge, only the port of ``platform_url`` on the host's addresses."""
    mode = settings.DOCKER_HOST_FIREWALL
    if mode == "off":
        return
    bridge = (network.get("Options") or {}).get(BRIDGE_OPTION) or ""
    if (
        not bridge.startswith(settings.DOCKER_BRIDGE_PREFIX)
        or not Path("/sys/class/net", bridge).exists()
    ):
        where = (
            f"network {network.get('Name')}'s bridge {bridge or '(unnamed)'} is not on this "
            "host (a remote engine?)"
        )
        if mode == "on":
            raise BackendError(
                f"docker: {where}; DOCKER_HOST_FIREWALL=on needs the engine on this host"
            )
        _warn_once(
            "docker: workspace bridges are not on this host (a remote engine?): its host "
            "must refuse what they send except the registry port (README, Workspace isolation)"
        )
        return
    install_bridge_firewall(platform_url)


def install_bridge_firewall(platform_url: str) -> None:
    """The rules for every interface named ``DOCKER_BRIDGE_PREFIX``*: workspace bridges and
    the host ends of veth links alike (one chain, installed once per process)."""
    parsed = urlparse(platform_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        docker_firewall.ensure_bridge_firewall(port)
    except docker_firewall.FirewallError as exc:
        raise BackendError(
            f"docker: cannot install the workspace bridge firewall (chain "
            f"{docker_firewall.bridge_chain(settings.WORKSPACE_FIREWALL_CHAIN)}): {exc}; without "
            "it workspaces reach every host service listening on all addresses. "
            "DOCKER_HOST_FIREWALL=off if the engine's host is firewalled otherwise"
        ) from exc


# -- what the Docker backend asks --------------------------------------------------------------
@dataclass(frozen=True)
class Attachment:
    """How a container is created on the network: the engine's ``network_mode``, whether its
    networking is disabled (``veth``: wired once it runs), and ``PLATFORM_URL`` as the container
    sees it (None: unchanged, on the host's network)."""

    network_mode: str
    disabled: bool = False
    platform_url: str | None = None

    @property
    def host_net(self) -> bool:
        return self.network_mode == "host"


def attach(client: docker.DockerClient, spec: LaunchSpec, *, known: bool) -> Attachment:
    """Make what the container's network needs before it is created (the workspace's network,
    the bridge firewall) and say how to create it. ``known``: an earlier instance of the
    workspace had its network (one engine call instead of two)."""
    platform_url = spec.env.get("PLATFORM_URL") or settings.PLATFORM_URL
    if wired():
        # No network of the engine's (a namespace with lo alone, and no prestart hook), the
        # link made by wire() once the container runs.
        via = link(spec).gateway
        if settings.DOCKER_HOST_FIREWALL != "off":
            install_bridge_firewall(platform_url)
        return Attachment("none", True, platform_url_via(platform_url, via))
    if own_network():
        attrs = ensure_network(client, spec, known=known)
        ensure_bridge_firewall(attrs, platform_url)
        via = gateway(attrs)
        return Attachment(
            network_name(spec.workspace_id), False, platform_url_via(platform_url, via)
        )
    return Attachment("host")


def running_address(container: Container, spec: LaunchSpec) -> State:
    """Where the running container's ports are reached from the host (the reverse proxy routes
    there), wiring its link first in ``veth`` mode; 127.0.0.1 with host networking."""
    if wired():
        return {"network": bridge_name(spec.workspace_id), "address": wire(container, spec).address}
    if not own_network():
        return {"network": "host", "address": "127.0.0.1"}
    name = network_name(spec.workspace_id)
    networks = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
    address = (networks.get(name) or {}).get("IPAddress") or ""
    return {"network": name, "address": address}


def forget(client: docker.DockerClient, workspace_id: UUID | str) -> None:
    """Remove the workspace's networks and the host end of its link. After its containers: a
    network with an endpoint attached cannot be removed."""
    remove_networks(client, workspace_id)
    unwire(workspace_id)
