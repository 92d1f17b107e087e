"""``python manage.py refill_pools``: run the warm pools' sweep now and print each pool."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from provisioning import pools
from workspaces.services import pools as pool_services


class Command(BaseCommand):
    help = (
        "Refill every warm pool to its size and retire members that must not be claimed (the "
        "sweep beat runs), then print each pool's members by state."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--template", help="sweep this template's pool only")

    def handle(self, *args: Any, template: str | None = None, **options: Any) -> None:
        for report in pools.sweep(template):
            self.stdout.write(report.line())
        for counts in pool_services.pool_counts():
            self.stdout.write(
                f"{counts.template} [{counts.backend}]: desired {counts.desired}, ready "
                f"{counts.ready}, starting {counts.starting}, failed {counts.failed}, "
                f"stale {counts.stale}"
            )
