"""``python manage.py workspace <command>``: the operators' command line.

``list``, ``status``, ``logs``, ``events`` read; ``create``, ``start``, ``stop``, ``restart`` and
``remove`` go through the same services as the API and the admin (the same gate, the same
coalescing), recorded with the actor ``manage.py:<os user>``. A workspace is named by its id or by
``owner/name``. ``--wait`` follows the workspace until it reaches the state the command asks for,
printing each status change and event; ``--json`` prints machine-readable output instead.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from provisioning import logs
from provisioning.backends.base import BackendError
from provisioning.idle import idle_stop_at
from workspaces import audit, selectors, services
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

S = WorkspaceStatus
REQUESTS = services.LIFECYCLE_REQUESTS
# What --wait waits for, and the statuses that end the wait as a failure.
TARGETS: dict[str, WorkspaceStatus] = {
    "create": S.ONLINE,
    "start": S.ONLINE,
    "restart": S.ONLINE,
    "stop": S.STOPPED,
    "remove": S.REMOVED,
}
FAILURES = {S.FAILED}


def label(workspace: Workspace) -> str:
    """``owner/name (id)``: how command output names a workspace."""
    return f"{workspace.owner.username}/{workspace.name} ({workspace.id})"


def resolve(reference: str) -> Workspace:
    """A workspace by id, or by ``owner/name`` (the one not removed)."""
    rows = Workspace.objects.select_related("owner").defer("env", "backend_state")
    if "/" in reference:
        owner, _, name = reference.partition("/")
        found = (
            rows.filter(owner__username=owner, name=name)
            .exclude(status=S.REMOVED)
            .order_by("-created_at")
            .first()
        )
        if found is None:
            raise CommandError(f"no workspace named {reference!r} (removed ones need their id)")
        return found
    try:
        workspace_id = uuid.UUID(reference)
    except ValueError:
        raise CommandError(
            f"{reference!r} is not a workspace id (a UUID) or a name (owner/name)"
        ) from None
    found = rows.filter(id=workspace_id).first()
    if found is None:
        raise CommandError(f"no workspace {workspace_id}")
    return found


def _idle_stop(workspace: Workspace) -> str:
    """When the idle policy will stop the workspace (the API's ``idle_stop_at``), or ``-``."""
    stop_at = idle_stop_at(workspace)
    return f"{stop_at:%Y-%m-%d %H:%M:%S}" if stop_at else "-"


def _age(since: Any) -> str:
    if since is None:
        return "-"
    seconds = int((timezone.now() - since).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


class Command(BaseCommand):
    help = (
        "Operate workspaces: list, status, logs, events, create, start, stop, restart, remove. "
        "Name a workspace by id or owner/name."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", required=True, metavar="command")

        listing = commands.add_parser("list", help="list workspaces (not removed)")
        listing.add_argument("--owner", help="only this user's")
        listing.add_argument("--status", choices=S.values)
        listing.add_argument("--json", action="store_true")

        status = commands.add_parser("status", help="one workspace's fields")
        status.add_argument("workspace", help="id or owner/name")
        status.add_argument("--json", action="store_true")

        logs = commands.add_parser("logs", help="the last lines of a workspace's output")
        logs.add_argument("workspace", help="id or owner/name")
        logs.add_argument("--tail", type=int, default=settings.LOGS_DEFAULT_TAIL)
        logs.add_argument("--json", action="store_true")

        events = commands.add_parser("events", help="a workspace's events, oldest first")
        events.add_argument("workspace", help="id or owner/name")
        events.add_argument("--limit", type=int, default=50, help="the last N (default 50)")
        events.add_argument("--json", action="store_true")

        create = commands.add_parser("create", help="create a workspace: owner/name")
        create.add_argument("workspace", help="owner/name (the owner must exist)")
        create.add_argument("--template", default=settings.WORKSPACE_DEFAULT_TEMPLATE)
        create.add_argument(
            "--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
        )
        self._wait_options(create)

        for verb in REQUESTS:
            request = commands.add_parser(verb, help=f"request {verb}")
            request.add_argument("workspace", help="id or owner/name")
            self._wait_options(request)

    @staticmethod
    def _wait_options(parser: CommandParser) -> None:
        parser.add_argument("--wait", action="store_true", help="follow until the target state")
        parser.add_argument("--timeout", type=float, default=900.0, help="--wait limit (s)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, command: str, **options: Any) -> None:
        if command == "list":
            self._list(options)
        elif command == "status":
            self._status(resolve(options["workspace"]), options)
        elif command == "logs":
            self._logs(resolve(options["workspace"]), options)
        elif command == "events":
            self._events(resolve(options["workspace"]), options)
        elif command == "create":
            self._create(options)
        else:
            self._request(command, resolve(options["workspace"]), options)

    # -- reads ------------------------------------------------------------------------------------
    # The API's serializers are imported where --json or status needs them: every other command
    # (a restart storm runs many at once) starts without loading DRF and its schema tools.
    @staticmethod
    def _shape(workspace: Any, many: bool = False) -> Any:
        from portal.api.serializers import WorkspaceSerializer

        return WorkspaceSerializer(workspace, many=many).data

    def _json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, default=str))

    def _list(self, options: dict[str, Any]) -> None:
        rows = selectors.list_workspaces(
            None, status=options.get("status"), owner=options.get("owner"), ordering="owner"
        )
        if options["json"]:
            self._json(self._shape(rows, many=True))
            return
        header = (
            f"{'OWNER/NAME':<32} {'STATUS':<13} {'FOR':>5} {'TEMPLATE':<20} {'BACKEND':<8} "
            f"{'IDLE STOP':<20} ID"
        )
        self.stdout.write(header)
        for workspace in rows:
            name = f"{workspace.owner.username}/{workspace.name}"
            self.stdout.write(
                f"{name:<32} {workspace.status:<13} {_age(workspace.status_changed_at):>5} "
                f"{workspace.template:<20} {workspace.backend:<8} {_idle_stop(workspace):<20} "
                f"{workspace.id}"
            )

    def _status(self, workspace: Workspace, options: dict[str, Any]) -> None:
        data = self._shape(workspace)
        if options["json"]:
            self._json(data)
            return
        self.stdout.write(label(workspace))
        for key, value in data.items():
            if key not in ("id", "name", "owner"):
                self.stdout.write(f"  {key:<22} {value}")

    def _logs(self, workspace: Workspace, options: dict[str, Any]) -> None:
        if not 0 <= options["tail"] <= settings.LOGS_MAX_TAIL:
            raise CommandError(f"--tail must be between 0 and {settings.LOGS_MAX_TAIL}")
        try:
            output = logs.workspace_logs(workspace, options["tail"])
        except BackendError as exc:
            raise CommandError(f"{label(workspace)}: {exc}") from None
        if options["json"]:
            self._json({"workspace_id": str(workspace.id), "lines": output.splitlines()})
            return
        self.stderr.write(f"== logs of {label(workspace)}, status {workspace.status}")
        if output:
            self.stdout.write(output)

    def _events(self, workspace: Workspace, options: dict[str, Any]) -> None:
        events = list(selectors.workspace_events(workspace.id).order_by("-id")[: options["limit"]])
        events.reverse()
        if options["json"]:
            from portal.api.serializers import WorkspaceEventSerializer

            self._json(WorkspaceEventSerializer(events, many=True).data)
            return
        self.stdout.write(f"events of {label(workspace)}")
        for event in events:
            self.stdout.write(self._event_line(event))

    @staticmethod
    def _event_line(event: Any) -> str:
        payload = json.dumps(event.payload, sort_keys=True) if event.payload else ""
        return (
            f"  {event.created_at:%Y-%m-%d %H:%M:%S} gen {event.generation:<3} {event.type:<28} "
            f"{event.source:<12} {event.actor:<20} {payload}"
        )

    # -- writes -----------------------------------------------------------------------------------
    def _create(self, options: dict[str, Any]) -> None:
        owner_name, slash, name = options["workspace"].partition("/")
        if not slash:
            raise CommandError("create takes owner/name")
        owner = get_user_model().objects.filter(username=owner_name).first()
        if owner is None:
            raise CommandError(f"no user {owner_name!r}")
        env: dict[str, str] = {}
        for item in options["env"]:
            key, equals, value = item.partition("=")
            if not equals:
                raise CommandError(f"--env {item!r}: expected KEY=VALUE")
            env[key] = value
        try:
            workspace = services.create_workspace(
                owner=owner,
                name=name,
                template=options["template"],
                env=env,
                actor=audit.manage_py(),
            )
        except (services.InvalidInput, services.LimitExceeded) as exc:
            raise CommandError(str(exc)) from None
        self._done("create", workspace, options)

    def _request(self, verb: str, workspace: Workspace, options: dict[str, Any]) -> None:
        try:
            workspace = REQUESTS[verb](workspace.id, actor=audit.manage_py())
        except Workspace.DoesNotExist:
            raise CommandError(f"no workspace {workspace.id}") from None
        except (services.TransitionNotAllowed, services.LimitExceeded) as exc:
            raise CommandError(f"{label(workspace)}: {exc}") from None
        self._done(verb, workspace, options)

    def _done(self, verb: str, workspace: Workspace, options: dict[str, Any]) -> None:
        seq = workspace.requested_seq  # the request this command made (or a later one)
        workspace = resolve(str(workspace.id))
        if not options["json"] or options["wait"]:
            self.stderr.write(f"{verb} requested for {label(workspace)}: status {workspace.status}")
        if options["wait"]:
            workspace = self._wait(verb, workspace, seq, options["timeout"], quiet=options["json"])
        if options["json"]:
            self._json(self._shape(workspace))
        elif not options["wait"]:
            self.stdout.write(f"{verb} requested for {label(workspace)}: status {workspace.status}")

    def _wait(
        self, verb: str, workspace: Workspace, seq: int, timeout: float, *, quiet: bool
    ) -> Workspace:
        """Follow the workspace until a cycle that answers this request (``handled_seq`` reached
        ``seq``) leaves it in the verb's target status, printing each status change and each
        new event (to stderr when --json keeps stdout for the result)."""
        target = TARGETS[verb]
        out = self.stderr if quiet else self.stdout
        began = time.monotonic()
        last_event = (
            selectors.workspace_events(workspace.id).order_by("-id").values_list("id", flat=True)
        ).first() or 0
        if verb == "create":
            last_event = 0
        seen_status = ""
        while True:
            workspace.refresh_from_db(fields=["status", "last_error", "handled_seq"])
            answered = workspace.handled_seq >= seq
            for event in selectors.workspace_events(workspace.id, after=last_event):
                last_event = event.id
                out.write(self._event_line(event))
            elapsed = time.monotonic() - began
            if workspace.status != seen_status:
                seen_status = workspace.status
                out.write(f"[{elapsed:6.1f}s] {label(workspace)} is {workspace.status}")
            if workspace.status == target and (answered or target == S.REMOVED):
                out.write(f"[{elapsed:6.1f}s] {label(workspace)} reached {target}")
                return workspace
            if workspace.status in FAILURES and answered:
                raise CommandError(
                    f"{label(workspace)} is {workspace.status}: {workspace.last_error or '?'}"
                )
            if elapsed > timeout:
                raise CommandError(
                    f"{label(workspace)} is still {workspace.status} after {timeout:.0f} s "
                    f"(waiting for {target})"
                )
            time.sleep(0.5)
