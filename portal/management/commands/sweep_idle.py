"""``python manage.py sweep_idle``: run one idle auto-stop sweep now."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from provisioning import idle


class Command(BaseCommand):
    help = (
        "Stop workspaces idle longer than their template's idle timeout (the same sweep beat "
        "runs) and print what was stopped."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        report = idle.sweep_idle()
        for workspace_id in report.stopped:
            self.stdout.write(f"stop requested {workspace_id}: idle past its timeout")
        for workspace_id, reason in report.skipped:
            self.stderr.write(f"skipped {workspace_id}: {reason}")
        for workspace_id in report.left_alone:
            self.stdout.write(f"left alone {workspace_id}: used or changed before the stop")
        self.stdout.write(
            f"scanned {report.scanned}, stopped {len(report.stopped)}, "
            f"skipped {len(report.skipped)}, left alone {len(report.left_alone)}"
        )
