"""``python manage.py sweep_provisioning``: run one stuck-provisioning sweep now."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from provisioning import sweeper


class Command(BaseCommand):
    help = (
        "Fail workspaces stuck in provisioning past their deadline (the same sweep beat runs) "
        "and print what was flipped."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-lock",
            action="store_true",
            help="sweep even if another sweep holds the lock (safe: every flip is a "
            "compare-and-set; the lock only saves duplicate work)",
        )

    def handle(self, *args: Any, no_lock: bool = False, **options: Any) -> None:
        report = sweeper.sweep(use_lock=not no_lock)
        if report.overlapped:
            self.stdout.write("another sweep is running; nothing done (use --no-lock to force)")
            return
        for flipped in report.flipped:
            self.stdout.write(flipped.line())
        for skipped in report.skipped:
            self.stderr.write(skipped.line())
        for workspace_id in report.deferred:
            self.stdout.write(f"deferred {workspace_id}: failed a recent sweep, pushed forward")
        for workspace_id in report.left_alone:
            self.stdout.write(f"left alone {workspace_id}: it changed before the flip")
        self.stdout.write(
            f"scanned {report.scanned} in flight, flipped {len(report.flipped)}, "
            f"skipped {len(report.skipped)}, deferred {len(report.deferred)}, "
            f"left alone {len(report.left_alone)}"
        )
