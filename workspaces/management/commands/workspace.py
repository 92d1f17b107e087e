"""``python manage.py workspace start|stop|restart|remove <id>``: the programmatic path.

The same services as the API and the admin, so the same gate and the same coalescing apply.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workspaces import services
from workspaces.models import Workspace

ACTIONS = {
    "start": services.request_start,
    "stop": services.request_stop,
    "restart": services.request_restart,
    "remove": services.request_remove,
}


class Command(BaseCommand):
    help = "Request start, stop, restart or remove of a workspace (enqueued; returns at once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=sorted(ACTIONS))
        parser.add_argument("workspace_id")

    def handle(self, *args: Any, action: str, workspace_id: str, **options: Any) -> None:
        try:
            ws_id = uuid.UUID(workspace_id)
        except ValueError:
            raise CommandError(f"{workspace_id!r} is not a workspace id (a UUID)") from None
        try:
            workspace = ACTIONS[action](ws_id)
        except Workspace.DoesNotExist:
            raise CommandError(f"no workspace {ws_id}") from None
        except services.TransitionNotAllowed as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"{action} requested for {workspace.name} ({workspace.id}): status {workspace.status}"
        )
