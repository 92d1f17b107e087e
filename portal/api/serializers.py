from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from provisioning import idle
from provisioning.routes import workspace_url
from workspaces import selectors, services
from workspaces.manifests import Template
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import WorkspaceStatus
from workspaces.timeouts import idle_timeout_seconds, provision_timeout_seconds


class StrictStringMapField(serializers.Field):
    """A JSON object of strings to strings. Unlike DictField(CharField) it does not coerce
    numbers or booleans into strings: ``{"A": 1}`` is a 400 naming ``env``."""

    def to_internal_value(self, data: Any) -> dict[str, str]:
        try:
            return services.validate_env(data)
        except services.InvalidInput as exc:
            raise serializers.ValidationError(exc.message) from None

    def to_representation(self, value: Any) -> dict[str, str]:  # pragma: no cover - write-only
        return {}


# PostgreSQL's bigint: ids above it are a 400, not an out-of-range error from the database.
MAX_ID = 2**63 - 1


class StrictCharField(serializers.CharField):
    """A JSON string, taken exactly as sent. DRF's CharField turns a number into its text
    (``1e999`` became a workspace named ``inf``) and trims whitespace (``"abc\\n"`` became
    ``abc``, ``" shell-default"`` the template ``shell-default``); this one refuses anything but a
    string and keeps every character, so the rule that judges the value sees what was sent."""

    default_error_messages = {"invalid": "must be a JSON string"}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class BodySerializer(serializers.Serializer):
    """A request body: a JSON object whose every key is one of the declared fields. DRF ignores
    other keys, so ``{"owner": ..., "status": ...}`` on a create was accepted and silently
    dropped; here each one is a 400 naming it (with the errors of the declared fields, if any).
    ``read_only_names`` are fields the answer shows but a request cannot set."""

    read_only_names: frozenset[str] = frozenset()

    def _unknown(self, data: Any) -> dict[str, list[str]]:
        if not isinstance(data, Mapping):
            return {}
        accepted = ", ".join(name for name, field in self.fields.items() if not field.read_only)
        return {
            str(name): [
                "is read-only"
                if name in self.read_only_names
                else f"is not a field of this request (accepted: {accepted or 'none'})"
            ]
            for name in sorted(set(data) - set(self.fields), key=str)
        }

    def to_internal_value(self, data: Any) -> Any:
        unknown = self._unknown(data)
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if unknown and isinstance(exc.detail, dict):
                raise serializers.ValidationError({**exc.detail, **unknown}) from None
            raise
        if unknown:
            raise serializers.ValidationError(unknown)
        return value


# The fields of the workspace's representation (WorkspaceSerializer), in their order. A request
# that sends one it cannot set hears that it is read-only rather than unknown.
WORKSPACE_FIELDS = (
    "id",
    "name",
    "owner",
    "template",
    "runtime",
    "backend",
    "sandbox",
    "parent",
    "members",
    "status",
    "desired_state",
    "is_running",
    "last_started_at",
    "last_heartbeat_at",
    "last_activity_at",
    "idle_stop_at",
    "pending_changes",
    "last_error",
    "provision_timeout_ms",
    "url",
    "generation",
    "created_at",
    "updated_at",
)


@extend_schema_field(
    {"type": "string", "pattern": services.NAME_RE.pattern, "minLength": 1, "maxLength": 63}
)
class NameField(StrictCharField):
    """A workspace name; the schema carries its pattern."""


ENV_SCHEMA = {
    "type": "object",
    "maxProperties": services.MAX_ENV_VARS,
    "additionalProperties": {"type": "string"},
    "description": "write-only; names match `[A-Za-z_][A-Za-z0-9_]*`; at most "
    f"{services.MAX_ENV_VARS} variables, each value "
    f"at most {services.MAX_ENV_VALUE_BYTES} bytes, names and values together at most "
    f"{services.MAX_ENV_TOTAL_BYTES} bytes (UTF-8)",
}


class WorkspaceCreateSerializer(BodySerializer):
    read_only_names = frozenset(WORKSPACE_FIELDS) - {"name", "template"}

    name = NameField(max_length=63)
    template = StrictCharField(max_length=100)
    env = extend_schema_field(ENV_SCHEMA)(StrictStringMapField)(required=False, write_only=True)

    def validate_name(self, value: str) -> str:
        try:
            return services.validate_name(value)
        except services.InvalidInput as exc:
            raise serializers.ValidationError(exc.message) from None


class WorkspaceUpdateSerializer(BodySerializer):
    """``PATCH /api/workspaces/{id}/``: ``name`` and/or ``env`` (write-only; replaces the whole
    map). The env reaches the instance at its next start or restart (``pending_changes``)."""

    read_only_names = frozenset(WORKSPACE_FIELDS) - set(services.UPDATABLE_FIELDS)

    name = NameField(max_length=63, required=False)
    env = extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})(
        StrictStringMapField
    )(required=False, write_only=True)

    def validate_name(self, value: str) -> str:
        try:
            return services.validate_name(value)
        except services.InvalidInput as exc:
            raise serializers.ValidationError(exc.message) from None


class EmptyBodySerializer(BodySerializer):
    """The body of a request that takes none (start, stop, restart, delete): nothing, or ``{}``.
    Anything else is refused like an unknown field of any other body, not silently ignored."""

    read_only_names = frozenset(WORKSPACE_FIELDS)


class TeamMemberSerializer(serializers.ModelSerializer):
    class Meta:
        model = Workspace
        fields = ["id", "name", "status"]
        read_only_fields = fields


_DATETIME = serializers.DateTimeField()  # the API's representation of a time


def _time(value: Any) -> str | None:
    return _DATETIME.to_representation(value) if value else None


class WorkspaceSerializer(serializers.ModelSerializer):
    provision_timeout_ms = serializers.SerializerMethodField()
    idle_stop_at = serializers.SerializerMethodField()
    pending_changes = serializers.SerializerMethodField()
    members = TeamMemberSerializer(many=True, read_only=True)
    # The owner's username: staff see everyone's workspaces and need to tell them apart.
    owner = serializers.CharField(source="owner.username", read_only=True)
    url = serializers.SerializerMethodField()

    class Meta:
        model = Workspace
        fields = list(WORKSPACE_FIELDS)
        read_only_fields = fields

    def to_representation(self, workspace: Workspace) -> dict[str, Any]:
        """Every field of ``Meta.fields``, built directly. The create's answer and each row of a
        list page come from here, where DRF's field-by-field path (building the fields, then a
        lookup and a call per field) cost about ten times as much; the declared fields above
        still describe the schema, and a test checks that both paths give the same JSON for
        workspaces in every state."""
        return {
            "id": str(workspace.id),
            "name": workspace.name,
            "owner": workspace.owner.username,
            "template": workspace.template,
            "runtime": workspace.runtime,
            "backend": workspace.backend,
            "sandbox": workspace.sandbox,
            "parent": None if workspace.parent_id is None else str(workspace.parent_id),
            "members": [
                {"id": str(member.id), "name": member.name, "status": str(member.status)}
                for member in workspace.members.all()
            ],
            "status": str(workspace.status),
            "desired_state": str(workspace.desired_state),
            "is_running": workspace.is_running,
            "last_started_at": _time(workspace.last_started_at),
            "last_heartbeat_at": _time(workspace.last_heartbeat_at),
            "last_activity_at": _time(workspace.last_activity_at),
            "idle_stop_at": self.get_idle_stop_at(workspace),
            "pending_changes": self.get_pending_changes(workspace),
            "last_error": workspace.last_error,
            "provision_timeout_ms": self.get_provision_timeout_ms(workspace),
            "url": self.get_url(workspace),
            "generation": workspace.generation,
            "created_at": _time(workspace.created_at),
            "updated_at": _time(workspace.updated_at),
        }

    def get_provision_timeout_ms(self, workspace: Workspace) -> int:
        return provision_timeout_seconds(workspace.template, workspace.runtime) * 1000

    @extend_schema_field({"type": "string", "format": "date-time", "nullable": True})
    def get_idle_stop_at(self, workspace: Workspace) -> str | None:
        return _time(idle.idle_stop_at(workspace))

    @extend_schema_field({"type": "array", "items": {"type": "string", "enum": ["env"]}})
    def get_pending_changes(self, workspace: Workspace) -> list[str]:
        """Fields changed since the current (or last) instance was launched: they take effect
        on the next start or restart."""
        return ["env"] if workspace.env_version > workspace.started_env_version else []

    @extend_schema_field({"type": "string", "format": "uri", "nullable": True})
    def get_url(self, workspace: Workspace) -> str | None:
        """Where the owner opens the workspace's app through the proxy; null while it has none
        (no app in its template, or not online/degraded/offline)."""
        return workspace_url(workspace)


class TeamCreateSerializer(WorkspaceCreateSerializer):
    """``template`` names a team template (a manifest with ``members``); ``env`` goes to the
    parent and to every member."""


class TeamSerializer(serializers.Serializer):
    parent = WorkspaceSerializer()
    members = WorkspaceSerializer(many=True)


class WorkspaceEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = WorkspaceEvent
        fields = ["id", "type", "source", "actor", "generation", "payload", "created_at"]
        read_only_fields = fields


class LiveEventSerializer(WorkspaceEventSerializer):
    """An event on the live stream: which workspace it belongs to is part of it."""

    workspace_id = serializers.UUIDField(read_only=True)

    class Meta(WorkspaceEventSerializer.Meta):
        fields = [
            "id",
            "workspace_id",
            "type",
            "source",
            "actor",
            "generation",
            "payload",
            "created_at",
        ]
        read_only_fields = fields


class EventStreamFilterSerializer(serializers.Serializer):
    # Also accepted as the Last-Event-ID header, which EventSource sends when it reconnects.
    after = serializers.IntegerField(required=False, min_value=0, max_value=MAX_ID)
    # One workspace's events only: they are recorded in id order, so resuming after the last
    # one seen misses none (a stream of several workspaces may see their ids interleave).
    workspace = serializers.UUIDField(required=False)


class StatusFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=WorkspaceStatus.choices, required=False)


class WorkspaceListFilterSerializer(StatusFilterSerializer):
    """``GET /api/workspaces/`` filters (exact values) and ``ordering``."""

    owner = serializers.CharField(required=False, help_text="the owner's username (staff)")
    name = serializers.CharField(required=False)
    template = serializers.CharField(required=False)
    runtime = serializers.CharField(required=False)
    backend = serializers.CharField(required=False)
    ordering = serializers.ChoiceField(
        choices=[prefix + field for field in selectors.ORDERING_FIELDS for prefix in ("", "-")],
        required=False,
        help_text="a field, '-' first for descending; default -created_at",
    )


class LogsFilterSerializer(serializers.Serializer):
    tail = serializers.IntegerField(required=False, min_value=0)

    def validate_tail(self, value: int) -> int:
        if value > settings.LOGS_MAX_TAIL:
            raise serializers.ValidationError(f"must be at most {settings.LOGS_MAX_TAIL}")
        return value


class WorkspaceLogsSerializer(serializers.Serializer):
    workspace_id = serializers.UUIDField()
    name = serializers.CharField()
    owner = serializers.CharField()
    status = serializers.CharField()
    tail = serializers.IntegerField()
    lines = serializers.ListField(child=serializers.CharField(allow_blank=True))


class EventsFilterSerializer(serializers.Serializer):
    after = serializers.IntegerField(
        required=False, min_value=0, max_value=MAX_ID, help_text="only events with a larger id"
    )


class TemplateSerializer(serializers.Serializer):
    name = serializers.CharField()
    runtime = serializers.CharField()
    provision_timeout_seconds = serializers.SerializerMethodField()
    required_env = serializers.ListField(child=serializers.CharField())
    members = serializers.ListField(child=serializers.CharField())
    idle_timeout_seconds = serializers.SerializerMethodField()
    sandbox = serializers.CharField(help_text="the container runtime: runc or gvisor")

    def get_provision_timeout_seconds(self, template: Template) -> int:
        return provision_timeout_seconds(template.name, template.runtime)

    def get_idle_timeout_seconds(self, template: Template) -> int:
        return idle_timeout_seconds(template.name, template.runtime)


class AgentCallSerializer(serializers.Serializer):
    """Read as DRF reads, other keys ignored: the registry listener's fast path
    (project/registry_wsgi.py) answers the common calls itself and ignores other keys too, so
    the view refusing them would answer one body two ways; the two change together."""

    workspace_id = serializers.UUIDField()
    healthy = serializers.BooleanField(required=False, default=True)
    # Heartbeats only: the agent saw activity in the workspace since its previous heartbeat.
    active = serializers.BooleanField(required=False, default=False)
    # Registration only: the engine filled the config volume from the template's config image
    # (it was empty) since the last registration the agent made.
    config_copied = serializers.BooleanField(required=False, default=False)


class AgentResponseSerializer(serializers.Serializer):
    workspace_id = serializers.UUIDField()
    status = serializers.CharField()
    generation = serializers.IntegerField()
