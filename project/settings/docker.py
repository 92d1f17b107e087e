"""The Docker and Swarm backends: the engine, workspace networks and links, the host firewall for
bridges, containers' user and limits, config delivery."""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ImproperlyConfigured

from project.env import (
    env_choice,
    env_float,
    env_int,
    env_str,
    section,
)
from project.settings.workspaces import WORKSPACE_UID_RANGE

section("docker")
DOCKER_HOST = env_str(
    "DOCKER_HOST",
    "",
    doc=(
        "The engine, `unix://…` or `tcp://…`; empty: the Docker SDK's default "
        "(`unix:///var/run/docker.sock`)."
    ),
)
# "veth" (default): each container starts with networking disabled and the worker gives it a
# link of its own, a veth pair to the host (a /31 of DOCKER_VETH_SUBNET); needs the worker as root
# on the engine's host. "workspace": one internal bridge network per workspace, made and removed
# through the engine (a worker in a container, a remote engine; costs the engine about 0.17 s of
# CPU more per start, docs/architecture.md). "host": the host's network stack, an opt-in that
# lets workspaces reach every service listening on the host (README "Workspace isolation").
DOCKER_NETWORK_MODE = env_choice(
    "DOCKER_NETWORK_MODE",
    "veth",
    ("veth", "workspace", "host"),
    doc=(
        "`veth`: a link per workspace that the worker makes (root on the engine's "
        "host); `workspace`: one internal network per workspace, made through the "
        "engine; `host`: the host's network (an opt-in with a risk, docs/operating.md)."
    ),
)
# DOCKER_NETWORK_MODE=veth: the IPv4 range of the links. A workspace takes the /31 its slot picks
# (its isolation uid's offset in WORKSPACE_UID_RANGE): the even address is the host's end (its
# gateway), the odd one the container's. It must hold one /31 per uid of the range and be used by
# nothing else on the host.
DOCKER_VETH_SUBNET = env_str(
    "DOCKER_VETH_SUBNET",
    "10.213.0.0/16",
    doc=(
        "`veth`: the IPv4 range of the links, a /31 per uid of `WORKSPACE_UID_RANGE` "
        "(start-up refuses a range too small); used by nothing else on the host."
    ),
)
try:
    _veth_subnet = ipaddress.IPv4Network(DOCKER_VETH_SUBNET)
except ValueError as _exc:
    raise ImproperlyConfigured(
        f"DOCKER_VETH_SUBNET must be an IPv4 network such as 10.213.0.0/16: {_exc}"
    ) from None
_links, _uids = _veth_subnet.num_addresses // 2, WORKSPACE_UID_RANGE[1] - WORKSPACE_UID_RANGE[0] + 1
if _links < _uids:
    raise ImproperlyConfigured(
        f"DOCKER_VETH_SUBNET={DOCKER_VETH_SUBNET} holds {_links} /31 links, fewer than the "
        f"{_uids} uids of WORKSPACE_UID_RANGE (one link per live workspace)"
    )
# A workspace network's bridge (veth: the host end of its link) is named this prefix + the start
# of the workspace id (15 characters in all), so the host firewall matches them all with one
# wildcard.
DOCKER_BRIDGE_PREFIX = env_str(
    "DOCKER_BRIDGE_PREFIX",
    "wsbr",
    doc=(
        "The name prefix of workspace networks' bridges and of links' host ends (1-6 "
        "lowercase letters or digits), which the host firewall matches."
    ),
)
if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", DOCKER_BRIDGE_PREFIX):
    raise ImproperlyConfigured(
        "DOCKER_BRIDGE_PREFIX must be 1 to 6 lowercase letters or digits, starting with a letter"
    )
# The process backend's links (WORKSPACE_PROCESS_ISOLATION=uid): each workspace's network
# namespace reaches the host over a veth pair, the /31 of this range its uid's offset picks (even
# address: the host's end, odd: the workspace's), the host end named PROCESS_LINK_PREFIX + the
# uid, so whatever an earlier holder of the uid left is found by name and replaced. The same
# range as Docker's links by default: a uid is held by one live workspace of either backend. The
# prefix is the process backend's own, so the Docker bridges' iptables chain and the process
# links' nftables table each police their own links only.
PROCESS_LINK_PREFIX = env_str(
    "PROCESS_LINK_PREFIX",
    "wspl",
    doc=(
        "The name prefix of process workspaces' links' host ends (1-6 lowercase letters or"
        " digits; the uid follows it), which the process backend's nftables table matches."
    ),
    section="isolation",
)
if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", PROCESS_LINK_PREFIX):
    raise ImproperlyConfigured(
        "PROCESS_LINK_PREFIX must be 1 to 6 lowercase letters or digits, starting with a letter"
    )
if len(PROCESS_LINK_PREFIX) + len(str(WORKSPACE_UID_RANGE[1])) > 15:
    raise ImproperlyConfigured(
        f"PROCESS_LINK_PREFIX={PROCESS_LINK_PREFIX!r} and the uids of WORKSPACE_UID_RANGE name "
        "the links' host ends (prefix + uid), which the kernel caps at 15 characters: shorten "
        "the prefix"
    )
if PROCESS_LINK_PREFIX.startswith(DOCKER_BRIDGE_PREFIX) or DOCKER_BRIDGE_PREFIX.startswith(
    PROCESS_LINK_PREFIX
):
    raise ImproperlyConfigured(
        f"PROCESS_LINK_PREFIX={PROCESS_LINK_PREFIX!r} and DOCKER_BRIDGE_PREFIX="
        f"{DOCKER_BRIDGE_PREFIX!r} must not be the start of one another: each backend's "
        "firewall matches its own prefix"
    )
PROCESS_LINK_SUBNET = env_str(
    "PROCESS_LINK_SUBNET",
    DOCKER_VETH_SUBNET,
    doc=(
        "The IPv4 range of process workspaces' links to the host, a /31 per uid of "
        "`WORKSPACE_UID_RANGE`; unset: `DOCKER_VETH_SUBNET`."
    ),
    section="isolation",
    shown="(DOCKER_VETH_SUBNET)",
)
try:
    _link_subnet = ipaddress.IPv4Network(PROCESS_LINK_SUBNET)
except ValueError as _exc:
    raise ImproperlyConfigured(
        f"PROCESS_LINK_SUBNET must be an IPv4 network such as 10.213.0.0/16: {_exc}"
    ) from None
if _link_subnet.num_addresses // 2 < _uids:
    raise ImproperlyConfigured(
        f"PROCESS_LINK_SUBNET={PROCESS_LINK_SUBNET} holds {_link_subnet.num_addresses // 2} /31 "
        f"links, fewer than the {_uids} uids of WORKSPACE_UID_RANGE (one link per live workspace)"
    )
# The host firewall for workspace bridges (<WORKSPACE_FIREWALL_CHAIN>-BRIDGE): without it, a
# workspace reaches every host service listening on all addresses (PostgreSQL, sshd, ...) at its
# gateway. "auto": installed whenever the workspace's bridge is in this host's network namespace
# (the engine runs here), and a launch fails naming the error when it cannot be; a bridge
# elsewhere (a remote engine) is logged: its host needs the same rules. "on": as auto, and a
# bridge that is not here fails the launch. "off": never installed (the engine's host is
# firewalled by other means).
DOCKER_HOST_FIREWALL = env_choice(
    "DOCKER_HOST_FIREWALL",
    "auto",
    ("auto", "on", "off"),
    doc=(
        "The host firewall for workspace bridges: `auto` installs it when the bridge is"
        " on this host, `on` also fails a launch whose bridge is not, `off` never "
        "installs it."
    ),
)
# The non-root user containers run as, and their default limits (a manifest's `resources`
# block overrides them).
DOCKER_WORKSPACE_USER = env_str(
    "DOCKER_WORKSPACE_USER",
    "10001:10001",
    doc=(
        "Numeric `uid:gid` containers run as (and own their config files); the agent "
        "image is built with it."
    ),
)
DOCKER_DEFAULT_MEMORY = env_str(
    "DOCKER_DEFAULT_MEMORY",
    "512m",
    doc="Memory limit of a container whose manifest has no `resources`.",
)
DOCKER_DEFAULT_CPUS = env_float(
    "DOCKER_DEFAULT_CPUS",
    1.0,
    doc="CPU limit of a container whose manifest has no `resources`.",
)
DOCKER_DEFAULT_PIDS = env_int(
    "DOCKER_DEFAULT_PIDS",
    256,
    minimum=1,
    doc="Process limit of a container whose manifest has no `resources`.",
)

# Sandboxing (a template's `sandbox: gvisor`): the name under which the engine has gVisor's
# runsc registered as a runtime (daemon.json "runtimes"). A start checks the engine's runtimes
# and fails at preflight naming this name when it is missing: never a fallback to runc.
DOCKER_GVISOR_RUNTIME = env_str(
    "DOCKER_GVISOR_RUNTIME",
    "runsc",
    doc=(
        "The engine's name for gVisor's runtime, run by templates with `sandbox: gvisor` "
        '(docs/operating.md, "Sandboxing").'
    ),
)
# Under gVisor the engine's pids limit counts the sandbox's own threads (the sentry's and the
# gofer's Go runtime threads, which grow with the host's CPUs and with blocking calls), not the
# workspace's processes, which live inside the sandbox's kernel: too low a limit makes the sentry
# fail to start its first thread. gVisor containers take this limit instead of the manifest's or
# DOCKER_DEFAULT_PIDS; their processes are bounded by the memory limit.
DOCKER_GVISOR_PIDS = env_int(
    "DOCKER_GVISOR_PIDS",
    4096,
    minimum=64,
    doc=(
        "Process limit of a gVisor container: it counts the sandbox's own threads, not the "
        "workspace's processes."
    ),
)

section("proxy")
DOCKER_APP_HOST = env_str(
    "DOCKER_APP_HOST",
    "127.0.0.1",
    doc=(
        "Where the proxy reaches a host-networked container's app; a container with an "
        "address of its own is reached there instead."
    ),
)

section("docker")
DOCKER_AGENT_IMAGE = env_str(
    "DOCKER_AGENT_IMAGE",
    "workspace-agent:dev",
    doc="Image of templates without `image:`, and the tag `build_agent_image` builds.",
)
DOCKER_CONFIG_MOUNT = env_str(
    "DOCKER_CONFIG_MOUNT",
    "/workspace/config",
    doc="Config volume mount point unless the template sets `config_mount`.",
)
# How a container's config volume gets the template's files. "image": the backend builds (once
# per template content) an image FROM the agent image with the files at DOCKER_CONFIG_MOUNT, and
# the engine copies them into the volume when the container is created and the volume is empty
# (first provision and recovery alike; the agent reports the copy). "archive": the platform
# writes them with one put_archive per provision, which costs the engine about as much as the
# container's creation. Templates with their own `command` (no platform agent) use "archive".
DOCKER_CONFIG_DELIVERY = env_choice(
    "DOCKER_CONFIG_DELIVERY",
    "image",
    ("image", "archive"),
    doc=(
        "How the config volume gets the template's files: `image` (the engine copies "
        "them from a config image into an empty volume; the agent reports it) or "
        "`archive` (one `put_archive` per provision). Templates with their own "
        "`command` use `archive`."
    ),
)
DOCKER_CONFIG_IMAGE = env_str(
    "DOCKER_CONFIG_IMAGE",
    "workspace-config",
    doc="The repository of the config images (tags `<template>-<digest>`).",
)
DOCKER_TIMEOUT_SECONDS = env_int(
    "DOCKER_TIMEOUT_SECONDS", 30, minimum=1, doc="Timeout of one engine call."
)
PLATFORM_ID = env_str(
    "PLATFORM_ID",
    "default",
    doc=(
        "Value of the `<prefix>.platform` label; listing and orphan cleanup touch only "
        "containers and volumes carrying this platform's value, so several control "
        "planes can share one engine."
    ),
)
DOCKER_LABEL_PREFIX = env_str("DOCKER_LABEL_PREFIX", "io.workspaces", doc="Prefix of every label.")
DOCKER_API_VERSION = env_str(
    "DOCKER_API_VERSION",
    "auto",
    doc="Engine API version to speak (`auto` asks the engine once per process).",
)
DOCKER_START_WAIT_SECONDS = env_int(
    "DOCKER_START_WAIT_SECONDS",
    20,
    minimum=1,
    doc="How long a start waits for the engine to report the container running.",
)
DOCKER_AGENT_BUSYBOX = env_str(
    "DOCKER_AGENT_BUSYBOX",
    "/bin/busybox",
    doc=(
        "Static busybox binary copied into the agent image (Debian's `busybox-static` "
        "installs it at `/bin/busybox`)."
    ),
)

section("swarm")
SWARM_MANAGER_HOST = env_str(
    "SWARM_MANAGER_HOST",
    "",
    doc=(
        "A manager's engine (`unix://…` or `tcp://…`); empty: `DOCKER_HOST`. Lets the "
        "Docker and Swarm backends run side by side, on two engines or on one (the "
        "Docker backend skips the containers of Swarm tasks, which carry the same "
        "labels)."
    ),
)
