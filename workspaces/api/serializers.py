from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from provisioning.manifests import Template
from provisioning.timeouts import provision_timeout_seconds
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import WorkspaceStatus


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


class WorkspaceCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63)
    template = serializers.CharField(max_length=100)
    env = extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})(
        StrictStringMapField
    )(required=False, write_only=True)

    def validate_name(self, value: str) -> str:
        try:
            return services.validate_name(value)
        except services.InvalidInput as exc:
            raise serializers.ValidationError(exc.message) from None


class WorkspaceSerializer(serializers.ModelSerializer):
    provision_timeout_ms = serializers.SerializerMethodField()

    class Meta:
        model = Workspace
        fields = [
            "id",
            "name",
            "template",
            "runtime",
            "backend",
            "parent",
            "status",
            "desired_state",
            "is_running",
            "last_started_at",
            "last_heartbeat_at",
            "last_error",
            "provision_timeout_ms",
            "generation",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_provision_timeout_ms(self, workspace: Workspace) -> int:
        return provision_timeout_seconds(workspace.template, workspace.runtime) * 1000


class TeamCreateSerializer(WorkspaceCreateSerializer):
    """``template`` names a team template (a manifest with ``members``); ``env`` goes to the
    parent and to every member."""


class TeamSerializer(serializers.Serializer):
    parent = WorkspaceSerializer()
    members = WorkspaceSerializer(many=True)


class WorkspaceEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = WorkspaceEvent
        fields = ["id", "type", "source", "generation", "payload", "created_at"]
        read_only_fields = fields


class LiveEventSerializer(WorkspaceEventSerializer):
    """An event on the live stream: which workspace it belongs to is part of it."""

    workspace_id = serializers.UUIDField(read_only=True)

    class Meta(WorkspaceEventSerializer.Meta):
        fields = ["id", "workspace_id", "type", "source", "generation", "payload", "created_at"]
        read_only_fields = fields


class EventStreamFilterSerializer(serializers.Serializer):
    # Also accepted as the Last-Event-ID header, which EventSource sends when it reconnects.
    after = serializers.IntegerField(required=False, min_value=0)


class StatusFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=WorkspaceStatus.choices, required=False)


class EventsFilterSerializer(serializers.Serializer):
    after = serializers.IntegerField(required=False, min_value=0)


class TemplateSerializer(serializers.Serializer):
    name = serializers.CharField()
    runtime = serializers.CharField()
    provision_timeout_seconds = serializers.SerializerMethodField()
    required_env = serializers.ListField(child=serializers.CharField())
    members = serializers.ListField(child=serializers.CharField())

    def get_provision_timeout_seconds(self, template: Template) -> int:
        return provision_timeout_seconds(template.name, template.runtime)


class AgentCallSerializer(serializers.Serializer):
    workspace_id = serializers.UUIDField()
    healthy = serializers.BooleanField(required=False, default=True)


class AgentResponseSerializer(serializers.Serializer):
    workspace_id = serializers.UUIDField()
    status = serializers.CharField()
    generation = serializers.IntegerField()
