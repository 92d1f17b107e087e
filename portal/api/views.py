"""Thin views: parse input with a serializer, call a service or a selector, render output."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, cast
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import User
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from redis.exceptions import RedisError
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal import live_events, live_logs
from portal.api.authentication import AgentTokenAuthentication
from portal.api.permissions import IsAgent
from portal.api.serializers import (
    MAX_ID,
    AgentCallSerializer,
    AgentResponseSerializer,
    EmptyBodySerializer,
    EventsFilterSerializer,
    EventStreamFilterSerializer,
    LogsFilterSerializer,
    TeamCreateSerializer,
    TeamSerializer,
    TemplateSerializer,
    WorkspaceCreateSerializer,
    WorkspaceEventSerializer,
    WorkspaceListFilterSerializer,
    WorkspaceLogsSerializer,
    WorkspaceSerializer,
    WorkspaceUpdateSerializer,
)
from provisioning import logs, readiness
from provisioning.backends.base import BackendError
from workspaces import audit, selectors, services
from workspaces import metrics as workspace_metrics
from workspaces.manifests import templates
from workspaces.models import AgentToken, Workspace
from workspaces.redis_client import get_redis


class WorkspaceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = WorkspaceSerializer
    # Beyond the errors every operation documents (portal.api.schema).
    error_responses = {
        # 409: the process backend's isolation refuses a new workspace (IsolationRefused).
        "create": (409, 429),
        "partial_update": (409,),
        # 415: a body they do not take is still parsed, to be refused if it has fields.
        "destroy": (415,),
        "start": (409, 415, 429),
        "stop": (409, 415),
        "restart": (409, 415, 429),
    }
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self) -> QuerySet[Workspace]:
        if self.action == "list":
            params = WorkspaceListFilterSerializer(data=self.request.query_params)
            params.is_valid(raise_exception=True)
            return selectors.list_workspaces(self.request.user, **params.validated_data)
        return selectors.visible_workspaces(self.request.user).select_related("owner")

    @extend_schema(parameters=[WorkspaceListFilterSerializer])
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(request=WorkspaceCreateSerializer, responses={201: WorkspaceSerializer})
    def create(self, request: Request) -> Response:
        data = WorkspaceCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        owner = cast(User, request.user)
        workspace = services.create_workspace(
            owner=owner, actor=audit.user(owner), **data.validated_data
        )
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=WorkspaceUpdateSerializer, responses={200: WorkspaceSerializer})
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        workspace_id = self.get_object().id
        data = WorkspaceUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        workspace = services.update_workspace(
            workspace_id,
            fields=frozenset(data.validated_data),
            actor=audit.user(request.user),
            **data.validated_data,
        )
        return Response(WorkspaceSerializer(workspace).data)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        _no_body(request)
        workspace = services.request_remove(self.get_object().id, actor=audit.user(request.user))
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        _no_body(request)
        workspace = services.request_start(self.get_object().id, actor=audit.user(request.user))
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        _no_body(request)
        workspace = services.request_stop(self.get_object().id, actor=audit.user(request.user))
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: WorkspaceSerializer})
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, pk: str | None = None) -> Response:
        _no_body(request)
        workspace = services.request_restart(self.get_object().id, actor=audit.user(request.user))
        return Response(WorkspaceSerializer(workspace).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[EventsFilterSerializer],
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

    @extend_schema(parameters=[LogsFilterSerializer], responses={200: WorkspaceLogsSerializer})
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str | None = None) -> Response:
        """The last ``tail`` lines of the workspace's output, from its backend (the process's
        output file; the container's logs). Poll it to follow the output."""
        params = LogsFilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        workspace = self.get_object()
        tail = params.validated_data.get("tail", settings.LOGS_DEFAULT_TAIL)
        try:
            output = logs.workspace_logs(workspace, tail)
        except BackendError as exc:
            raise BackendUnreachable(str(exc)) from exc
        data = {
            "workspace_id": workspace.id,
            "name": workspace.name,
            "owner": workspace.owner.username,
            "status": workspace.status,
            "tail": tail,
            "lines": output.splitlines() if output else [],
        }
        return Response(WorkspaceLogsSerializer(data).data)


def _no_body(request: Request) -> None:
    """A request that takes no body refuses one with fields instead of ignoring it."""
    EmptyBodySerializer(data=request.data).is_valid(raise_exception=True)


class BackendUnreachable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "the workspace's backend cannot be reached"


# What the schema says of each event of the stream (OpenAPI 3.0 has `schema` describe one event).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "the event id (resume with Last-Event-ID)"},
        "event": {"type": "string"},
        "data": {"type": "string", "description": "the event as JSON (LiveEvent)"},
        "retry": {"type": "integer"},
    },
}


class EventStreamView(APIView):
    """Server-Sent Events: the caller's workspaces' events (staff: everyone's) as they are
    recorded, or one workspace's (``?workspace=``). Resume with ``Last-Event-ID`` (or
    ``?after=``): events with a larger id are replayed from the database first. At most
    ``EVENTS_STREAMS_PER_USER`` open streams per user (429 with Retry-After beyond). Under the
    ASGI server an open stream holds no thread."""

    error_responses = {"get": (429, 503)}

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
                SSE_EVENT_SCHEMA, description="`id: <event id>` + `data: <event JSON>` frames"
            )
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        params = EventStreamFilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        after: int | None = params.validated_data.get("after")
        workspace: UUID | None = params.validated_data.get("workspace")
        header = request.headers.get("Last-Event-ID", "").strip()
        if header:
            # ASCII digits only ("²".isdigit() is true, int("²") fails) and within bigint; int()
            # only ever sees at most 19 digits (4,301 or more would raise).
            digits = header.lstrip("0") or "0"
            valid = header.isascii() and header.isdigit() and len(digits) <= 19
            if not valid or int(digits) > MAX_ID:
                raise exceptions.ValidationError(
                    {"Last-Event-ID": [f"must be an event id (an integer from 0 to {MAX_ID})"]}
                )
            after = int(digits)  # where the client got to: ahead of the URL's ?after=
        try:
            slot = live_events.acquire_slot(request.user)
        except live_events.TooManyStreams as exc:
            raise exceptions.Throttled(wait=exc.retry_after, detail=str(exc)) from None
        except RedisError:
            raise StreamUnavailable() from None
        frames: Iterator[bytes] | AsyncIterator[bytes]
        if isinstance(request._request, ASGIRequest):
            # Under the ASGI server this view runs in a short-lived thread; the stream itself is
            # a coroutine on the event loop, so an open stream holds no thread at all.
            frames = live_events.astream(request.user, after=after, workspace=workspace, slot=slot)
            connection.close()
        else:
            frames = live_events.stream(request.user, after=after, workspace=workspace, slot=slot)
        response = StreamingHttpResponse(frames, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each frame on at once
        return response


class StreamUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "live events are unavailable (Redis cannot be reached); poll the events"


LOG_SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {
            "type": "string",
            "enum": ["message", "instance", "end"],
            "description": "absent (message): a line; instance: the instance changed; end: the "
            "last frame",
        },
        "data": {
            "type": "string",
            "description": 'JSON: {"line", "truncated"} | {"change", "detail"} | '
            '{"reason", "detail"}',
        },
        "retry": {"type": "integer"},
    },
}


class WorkspaceLogStreamView(APIView):
    """Server-Sent Events: the workspace's last ``tail`` lines of output, then each new line as
    the instance writes it, with an ``instance`` event when the instance exits, goes away or is
    replaced (the stream keeps following the next one), and an ``end`` event before it closes
    (after ``LOGS_STREAM_MAX_SECONDS``; open a new one with ``tail=0``). At most
    ``LOGS_STREAMS_PER_USER`` open log streams per user (429 with Retry-After beyond). Under the
    ASGI server an open stream holds no thread."""

    error_responses = {"get": (429, 503)}

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # As the event stream: errors raised before the stream opens are JSON.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="workspaces_logs_stream",
        parameters=[LogsFilterSerializer],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                LOG_SSE_EVENT_SCHEMA,
                description='`data: {"line": …}` frames, `event: instance` and `event: end`',
            )
        },
    )
    def get(self, request: Request, id: UUID) -> StreamingHttpResponse:
        params = LogsFilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        tail = params.validated_data.get("tail", settings.LOGS_DEFAULT_TAIL)
        workspace = selectors.visible_workspaces(request.user).filter(id=id).first()
        if workspace is None:
            raise exceptions.NotFound()
        try:
            backend = logs.logs_backend(workspace)
        except BackendError as exc:
            raise BackendUnreachable(str(exc)) from exc
        try:
            slot = live_events.acquire_slot(
                request.user, kind="log", cap=settings.LOGS_STREAMS_PER_USER
            )
        except live_events.TooManyStreams as exc:
            raise exceptions.Throttled(wait=exc.retry_after, detail=str(exc)) from None
        except RedisError:
            raise LogStreamUnavailable() from None
        frames: Iterator[bytes] | AsyncIterator[bytes]
        if isinstance(request._request, ASGIRequest):
            frames = live_logs.astream(backend, workspace.id, tail=tail, slot=slot)
            connection.close()
        else:
            frames = live_logs.stream(backend, workspace.id, tail=tail, slot=slot)
        response = StreamingHttpResponse(frames, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response


class LogStreamUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "live logs are unavailable (Redis cannot be reached); poll the logs"


class TeamCreateView(APIView):
    error_responses = {"post": (409, 429)}

    @extend_schema(request=TeamCreateSerializer, responses={201: TeamSerializer})
    def post(self, request: Request) -> Response:
        data = TeamCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        owner = cast(User, request.user)
        team = services.create_team(owner=owner, actor=audit.user(owner), **data.validated_data)
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
    def _reply(workspace: Workspace | services.HeartbeatAnswer) -> Response:
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
    error_responses = {"post": (409,)}  # a workspace that is stopping or removing refuses it

    @extend_schema(request=AgentCallSerializer, responses={200: AgentResponseSerializer})
    def post(self, request: Request) -> Response:
        data = self._parse(request)
        return self._reply(
            services.register_agent(
                cast(AgentToken, request.auth),
                data["workspace_id"],
                config_copied=data["config_copied"],
            )
        )


class HeartbeatView(_AgentView):
    @extend_schema(request=AgentCallSerializer, responses={200: AgentResponseSerializer})
    def post(self, request: Request) -> Response:
        data = self._parse(request)
        workspace = services.record_heartbeat(
            cast(AgentToken, request.auth),
            data["workspace_id"],
            healthy=data["healthy"],
            active=data["active"],
        )
        return self._reply(workspace)


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    try:
        # Django's own liveness probe of a connection (a round trip on it), opened if needed.
        connection.ensure_connection()
        checks["database"] = "ok" if connection.is_usable() else "error: the connection is broken"
    except Exception as exc:  # readiness reports any failure, it never raises
        checks["database"] = f"error: {exc.__class__.__name__}: {exc}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}: {exc}"
    if settings.READYZ_REQUIRE_WORKERS and checks["redis"] == "ok":
        checks["workers"] = readiness.check_workers()
        checks["beat"] = readiness.check_beat()
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition (see ``workspaces/metrics.py``)."""
    body, content_type = workspace_metrics.render()
    return HttpResponse(body, content_type=content_type)
