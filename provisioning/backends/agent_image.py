"""The agent image (``workspace-agent:dev``): FROM scratch, Debian's static busybox with a link
per applet, the sh agent and the page its ``httpd`` serves. Built locally on each engine that
runs workspaces (``manage.py build_agent_image``); no registry, no pull."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

import docker
from django.conf import settings

from provisioning.agent import AGENT_PAGE, AGENT_SCRIPT
from provisioning.backends.base import CONFIG_COPIED, CONFIG_MARKER, BackendError
from provisioning.backends.engine import (
    engine_errors,
    label,
    make_client,
    safe_relative,
    workspace_user_ids,
)

AGENT_SH = AGENT_SCRIPT.with_name("agent.sh")
AGENT_DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
COPY --chown={uid}:{gid} config/ {mount}/
USER {uid}:{gid}
ENV PATH=/bin
LABEL {label}=agent
ENTRYPOINT ["/bin/sh", "/agent.sh"]
"""
# Applets linked even when `busybox --list` is unavailable: what agent.sh and tests use.
_APPLETS: tuple[str, ...] = (
    "sh",
    "cat",
    "date",
    "echo",
    "env",
    "kill",
    "ls",
    "mkdir",
    "printf",
    "ps",
    "rm",
    "stat",
    "touch",
)
_APPLETS += ("sleep", "test", "timeout", "wget", "httpd", "grep", "[", "[[", "true", "false")


def _applets(busybox: Path) -> list[str]:
    try:
        listed = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    return sorted(set(listed) | set(_APPLETS))


def agent_image_context(busybox: Path | None = None) -> bytes:
    """The build context of the agent image: a Dockerfile, Debian's static busybox with a link
    per applet, and the agent script. No base image, so no registry is needed."""
    binary = Path(busybox or settings.DOCKER_AGENT_BUSYBOX)
    if not binary.is_file():
        raise BackendError(
            f"{binary} not found: install Debian's busybox-static (apt-get install busybox-static) "
            "or set DOCKER_AGENT_BUSYBOX"
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))

        def folder(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            archive.addfile(info)

        uid, gid = workspace_user_ids()
        dockerfile = AGENT_DOCKERFILE.format(
            label=label("image"), uid=uid, gid=gid, mount=settings.DOCKER_CONFIG_MOUNT.rstrip("/")
        )
        add("Dockerfile", dockerfile.encode())
        for name in ("rootfs", "rootfs/bin", "rootfs/workspace", "rootfs/www"):
            folder(name)
        # The config mount point, owned by the workspace user: a new volume takes its owner
        # from the image's folder, so the non-root agent can write in its config volume.
        folder("config", 0o700)
        folder("rootfs/tmp", 0o1777)
        add("rootfs/bin/busybox", binary.read_bytes(), 0o755)
        for applet in _applets(binary):
            if "/" in applet or applet == "busybox":
                continue
            link = tarfile.TarInfo(f"rootfs/bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            archive.addfile(link)
        add("rootfs/agent.sh", AGENT_SH.read_bytes(), 0o755)
        # The page `httpd` serves when a template's app names no command.
        add("rootfs/www/index.html", AGENT_PAGE.read_bytes())
    return buffer.getvalue()


def build_agent_image(
    tag: str | None = None, busybox: Path | None = None, host: str | None = None
) -> str:
    """Build the default agent image on the engine at ``host`` (default DOCKER_HOST; a swarm
    needs it on every node's engine); returns the image id."""
    tag = tag or settings.DOCKER_AGENT_IMAGE
    context = agent_image_context(busybox)
    with engine_errors("connecting", host):
        client = make_client(host)
    with engine_errors(f"building image {tag}", host):
        try:
            image, _ = client.images.build(
                fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True, forcerm=True
            )
        except docker.errors.BuildError as exc:
            log = "".join(
                str(line.get("stream") or line.get("error") or "") for line in exc.build_log
            )
            raise BackendError(f"docker: building image {tag} failed: {exc.msg}\n{log}") from exc
        finally:
            client.close()
    return str(image.id)


# --- config images ----------------------------------------------------------------------------
CONFIG_DOCKERFILE = """\
FROM {base}
COPY --chown={uid}:{gid} config/ {mount}/
LABEL {label}=config
"""


def config_image_files(template_name: str, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """What a config image holds at the config mount: the template's files, the marker (last
    written by no one: the engine copies the whole folder at once) and the copy flag."""
    payload = {
        name: data for name, data in files.items() if name not in (CONFIG_MARKER, CONFIG_COPIED)
    }
    payload[CONFIG_MARKER] = json.dumps({"template": template_name, "source": "image"}).encode()
    payload[CONFIG_COPIED] = b""
    return payload


def config_image_tag(base_id: str, template_name: str, files: Mapping[str, bytes]) -> str:
    """``DOCKER_CONFIG_IMAGE:<template>-<digest>``: the digest covers the base image's id, the
    mount, the workspace user and every file, so a change to any of them is a new image."""
    uid, gid = workspace_user_ids()
    digest = hashlib.sha256()
    for part in (base_id, settings.DOCKER_CONFIG_MOUNT, f"{uid}:{gid}"):
        digest.update(part.encode() + b"\0")
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return f"{settings.DOCKER_CONFIG_IMAGE}:{template_name[:100]}-{digest.hexdigest()[:16]}"


def config_image_context(base: str, files: Mapping[str, bytes]) -> bytes:
    uid, gid = workspace_user_ids()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        dockerfile = CONFIG_DOCKERFILE.format(
            base=base,
            uid=uid,
            gid=gid,
            mount=settings.DOCKER_CONFIG_MOUNT.rstrip("/"),
            label=label("image"),
        )
        entries = {"Dockerfile": dockerfile.encode()}
        entries.update({f"config/{safe_relative(name)}": data for name, data in files.items()})
        folders: set[str] = {"config"}
        for name in entries:
            parts = name.split("/")[:-1]
            folders.update("/".join(parts[: index + 1]) for index in range(len(parts)))
        for folder in sorted(folders):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_config_image(
    client: docker.DockerClient, tag: str, base: str, files: Mapping[str, bytes]
) -> None:
    """Build the config image ``tag`` FROM ``base`` on ``client``'s engine (no pull: the base
    is local). Concurrent builds of one tag build the same content; the last one tags it."""
    with engine_errors(f"building config image {tag}"):
        try:
            client.images.build(
                fileobj=io.BytesIO(config_image_context(base, files)),
                custom_context=True,
                tag=tag,
                rm=True,
                forcerm=True,
                pull=False,
            )
        except docker.errors.BuildError as exc:
            log = "".join(
                str(line.get("stream") or line.get("error") or "") for line in exc.build_log
            )
            raise BackendError(f"docker: building image {tag} failed: {exc.msg}\n{log}") from exc
