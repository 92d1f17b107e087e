"""``python manage.py build_agent_image``: build the default agent image on the local engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from provisioning.backends.base import BackendError
from provisioning.backends.docker import build_agent_image, engine_url


class Command(BaseCommand):
    help = (
        "Build the default workspace agent image (a FROM scratch image with Debian's static "
        "busybox and the sh agent) on the Docker engine at DOCKER_HOST. Needs no registry."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--tag", default=None, help=f"image tag (default {settings.DOCKER_AGENT_IMAGE})"
        )
        parser.add_argument(
            "--busybox",
            default=None,
            type=Path,
            help=f"static busybox binary to copy (default {settings.DOCKER_AGENT_BUSYBOX})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tag = options["tag"] or settings.DOCKER_AGENT_IMAGE
        started = time.monotonic()
        try:
            image_id = build_agent_image(tag, options["busybox"])
        except BackendError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"built {tag} ({image_id[:19]}) on {engine_url()} in {time.monotonic() - started:.1f} s"
        )
