"""``python manage.py reconcile``: run one reconciliation pass now and print its repairs."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from provisioning.reconciler import reconcile_once


class Command(BaseCommand):
    help = (
        "Compare every workspace with its backend once, repair the rows that disagree and "
        "remove orphan instances; prints each repair."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the pass summary as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        report = reconcile_once()
        for repair in report.repairs:
            self.stdout.write(repair.line())
        if report.proxy.restored:
            self.stdout.write("proxy: configuration loaded")
        if report.proxy.error:
            self.stderr.write(f"proxy: {report.proxy.error}")
        for workspace_id in report.skipped_busy:
            self.stdout.write(f"{workspace_id} skipped: a cycle holds its gate")
        for name, reason in report.unavailable.items():
            self.stderr.write(f"backend {name} skipped: {reason}")
        for error in report.errors:
            self.stderr.write(f"error: {error}")
        if options["json"]:
            self.stdout.write(json.dumps(report.summary(), sort_keys=True))
        else:
            calls = report.total_backend_calls
            self.stdout.write(
                f"{report.workspaces} workspaces, {report.instances} instances, "
                f"{len(report.repairs)} repairs, {calls} backend calls"
            )
