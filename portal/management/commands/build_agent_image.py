"""``python manage.py build_agent_image``: build the default agent image on the local engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from provisioning.backends.agent_image import build_agent_image
from provisioning.backends.base import BackendError
from provisioning.backends.engine import engine_url


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
        parser.add_argument(
            "--host",
            action="append",
            default=None,
            help="engine to build on (repeat for each node of a swarm; default DOCKER_HOST)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tag = options["tag"] or settings.DOCKER_AGENT_IMAGE
        # A swarm never pulls the agent image: it must exist on every node's engine.
        for host in options["host"] or [None]:
            started = time.monotonic()
            try:
                image_id = build_agent_image(tag, options["busybox"], host)
            except BackendError as exc:
                raise CommandError(str(exc)) from exc
            elapsed = time.monotonic() - started
            self.stdout.write(
                f"built {tag} ({image_id[:19]}) on {engine_url(host)} in {elapsed:.1f} s"
            )
