"""The agent image (``workspace-agent:dev``): FROM scratch, Debian's static busybox with a link
per applet, the sh agent and the page its ``httpd`` serves. Built locally on each engine that
runs workspaces (``manage.py build_agent_image``); no registry, no pull."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import docker
from django.conf import settings

from provisioning.agent import AGENT_PAGE, AGENT_SCRIPT
from provisioning.backends.base import BackendError
from provisioning.backends.docker import _label, engine_errors, make_client, workspace_user_ids

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
_APPLETS += ("sleep", "test", "timeout", "wget", "httpd", "[", "[[", "true", "false")


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
            label=_label("image"), uid=uid, gid=gid, mount=settings.DOCKER_CONFIG_MOUNT.rstrip("/")
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
