"""Thin views: parse input with a serializer, call a service or a selector, render output."""

from __future__ import annotations

from typing import Any, cast

from django.contrib.auth.models import User
from django.db import connection
from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from provisioning.manifests import templates
from provisioning.redis_client import get_redis
from workspaces import live_events, selectors, services
from workspaces.api.authentication import AgentTokenAuthentication
from workspaces.api.permissions import IsAgent
from workspaces.api.serializers import (
    AgentCallSerializer,
    AgentResponseSerializer,
    EventsFilterSerializer,
    EventStreamFilterSerializer,
    StatusFilterSerializer,
    TeamCreateSerializer,
    TeamSerializer,
    TemplateSerializer,
    WorkspaceCreateSerializer,
    WorkspaceEventSerializer,
    WorkspaceSerializer,
)
from workspaces.models import AgentToken, Workspace


class WorkspaceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = WorkspaceSerializer
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self) -> QuerySet[Workspace]:
        if self.action == "list":
            params = StatusFilterSerializer(data=self.request.query_params)
            params.is_valid(raise_exception=True)
            return selectors.list_workspaces(
                self.request.user, status=params.validated_data.get("status")
            )
        return selectors.visible_workspaces(self.request.user)

    @extend_schema(parameters=[StatusFilterSerializer])
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(request=WorkspaceCreateSerializer, responses={201: WorkspaceSerializer})
    def create(self, request: Request) -> Response:
        data = WorkspaceCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        workspace = services.create_workspace(owner=cast(User, request.user), **data.validated_data)
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        workspace = services.request_remove(self.get_object().id)
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        workspace = services.request_start(self.get_object().id)
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        workspace = services.request_stop(self.get_object().id)
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, pk: str | None = None) -> Response:
        workspace = services.request_restart(self.get_object().id)
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[OpenApiParameter("after", int, description="only events with a larger id")],
        responses={200: WorkspaceEventSerializer(many=True)},
    )
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str | None = None) -> Response:
        params = EventsFilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        workspace = self.get_object()
        events = selectors.workspace_events(workspace.id, after=params.validated_data.get("after"))
        page = self.paginate_queryset(events)
        if page is not None:
            return self.get_paginated_response(WorkspaceEventSerializer(page, many=True).data)
        return Response(WorkspaceEventSerializer(events, many=True).data)


class EventStreamView(APIView):
    """Server-Sent Events: the caller's workspaces' events (staff: everyone's) as they are
    recorded. Resume with ``Last-Event-ID`` (or ``?after=``): events with a larger id are
    replayed from the database first. Each open stream holds one web thread for at most
    ``EVENTS_STREAM_MAX_SECONDS``."""

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # A client asking for text/event-stream gets the stream; the errors raised before it
        # opens (401, 400) are rendered as JSON whatever the Accept header said.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        parameters=[
            EventStreamFilterSerializer,
            OpenApiParameter(
                "Last-Event-ID",
                int,
                location=OpenApiParameter.HEADER,
                required=False,
                description="replay events with a larger id before the live ones",
            ),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR, description="`id: <event id>` + `data: <event JSON>` frames"
            )
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        header = request.headers.get("Last-Event-ID", "").strip()
        if header:
            if not header.isdigit():
                raise exceptions.ValidationError(
                    {"Last-Event-ID": ["must be an event id (a non-negative integer)"]}
                )
            after: int | None = int(header)
        else:
            params = EventStreamFilterSerializer(data=request.query_params)
            params.is_valid(raise_exception=True)
            after = params.validated_data.get("after")
        response = StreamingHttpResponse(
            live_events.stream(request.user, after=after), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each frame on at once
        return response


class TeamCreateView(APIView):
    @extend_schema(request=TeamCreateSerializer, responses={201: TeamSerializer})
    def post(self, request: Request) -> Response:
        data = TeamCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        team = services.create_team(owner=cast(User, request.user), **data.validated_data)
        return Response(
            TeamSerializer({"parent": team.parent, "members": team.members}).data,
            status=status.HTTP_201_CREATED,
        )


class TemplateListView(APIView):
    @extend_schema(responses={200: TemplateSerializer(many=True)})
    def get(self, request: Request) -> Response:
        items = sorted(templates().templates.values(), key=lambda template: template.name)
        return Response(TemplateSerializer(items, many=True).data)


class _AgentView(APIView):
    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]

    def _parse(self, request: Request) -> dict[str, Any]:
        data = AgentCallSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return dict(data.validated_data)

    @staticmethod
    def _reply(workspace: Workspace) -> Response:
        return Response(
            AgentResponseSerializer(
                {
                    "workspace_id": workspace.id,
                    "status": workspace.status,
                    "generation": workspace.generation,
                }
            ).data
        )


class RegisterView(_AgentView):
    @extend_schema(request=AgentCallSerializer, responses={200: AgentResponseSerializer})
    def post(self, request: Request) -> Response:
        data = self._parse(request)
        return self._reply(
            services.register_agent(cast(AgentToken, request.auth), data["workspace_id"])
        )


class HeartbeatView(_AgentView):
    @extend_schema(request=AgentCallSerializer, responses={200: AgentResponseSerializer})
    def post(self, request: Request) -> Response:
        data = self._parse(request)
        workspace = services.record_heartbeat(
            cast(AgentToken, request.auth), data["workspace_id"], healthy=data["healthy"]
        )
        return self._reply(workspace)


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports any failure, it never raises
        checks["database"] = f"error: {exc.__class__.__name__}: {exc}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}: {exc}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )
