"""Workspace, its events and its agent tokens.

The CHECK constraints are generated from the enums in ``status.py``; the migration test in
``tests/workspaces/test_status.py`` compares them with what PostgreSQL actually enforces.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from workspaces.fields import SealedEnvField
from workspaces.manifests import SANDBOXES
from workspaces.status import (
    IDLE_STOPPABLE_STATUSES,
    NOT_RUNNING_STATUSES,
    RUNNING_STATUSES,
    DesiredState,
    EventSource,
    EventType,
    WorkspaceStatus,
)


class Workspace(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="workspaces"
    )
    name = models.CharField(max_length=63)
    # The first label of the host the proxy serves the workspace's app at, ``<name>--<owner>``
    # (``workspaces.access.subdomain``; the host is ``<subdomain>.<WORKSPACE_DOMAIN>``), set with
    # the name. The proxy has one route for every workspace: the platform's check finds the
    # workspace by this column.
    subdomain = models.CharField(max_length=63 + 2 + 63, default="", editable=False)
    template = models.CharField(max_length=100)
    runtime = models.CharField(max_length=100)
    backend = models.CharField(max_length=32)
    # The container runtime the workspace runs under (the template's ``sandbox``, recorded at
    # create and never changed): "runc", the host's kernel, or "gvisor", a kernel of its own in
    # user space. A backend that cannot run it fails the start cycle at preflight.
    sandbox = models.CharField(
        max_length=16, choices=[(name, name) for name in SANDBOXES], default="runc", editable=False
    )
    # The team's parent workspace when this one was created as a team member (POST /api/teams/).
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="members"
    )
    status = models.CharField(
        max_length=16, choices=WorkspaceStatus.choices, default=WorkspaceStatus.PROVISIONING
    )
    # What the user asked for last; cycles converge the backend towards it.
    desired_state = models.CharField(
        max_length=16, choices=DesiredState.choices, default=DesiredState.RUNNING
    )
    is_running = models.BooleanField(default=False)
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    # When ``status`` last took a different value (set by ``services.transition`` only): the
    # admin's time-in-state column.
    status_changed_at = models.DateTimeField(null=True, blank=True)
    # Who made the latest request (``user:alice``, ``admin:bob``, ``manage.py``, ``beat``, ...):
    # the events of the cycle that answers it carry this actor.
    requested_by = models.CharField(max_length=150, blank=True, default="")
    # Fencing token: incremented under the gate when a cycle begins; every write of that cycle,
    # the agent token of that cycle and the sweeper's flip are conditioned on it.
    generation = models.BigIntegerField(default=0)
    # Every start / stop / restart / create request increments requested_seq; a cycle that
    # completes sets handled_seq to the value it read when it began. Requests that arrive while a
    # cycle runs therefore collapse into one more cycle.
    requested_seq = models.BigIntegerField(default=1)
    handled_seq = models.BigIntegerField(default=0)
    # When the current provisioning cycle began; the stuck-provisioning sweep measures from here.
    provisioning_started_at = models.DateTimeField(null=True, blank=True)
    # When the config volume was first populated; an empty volume after this is a recovery.
    config_populated_at = models.DateTimeField(null=True, blank=True)
    # Write-only: never serialized, never shown in the admin, never logged. Stored encrypted
    # (a Fernet token, workspaces/crypto.py); only the start cycle decrypts it.
    env = SealedEnvField()
    # PATCH of env increments env_version; a start cycle records the version it launched with
    # (read under the row lock with the env itself), so "the instance runs an older env" is exact.
    env_version = models.BigIntegerField(default=0)
    started_env_version = models.BigIntegerField(default=0)
    # The last real activity (the agent's heartbeat says so, a request through the workspace's
    # proxy route, a start / restart / edit through the API, a new cycle). The idle sweep stops a
    # workspace whose template's idle timeout has passed since then.
    last_activity_at = models.DateTimeField(default=timezone.now)
    # Why the pending stop was asked for when no person asked (the idle policy); the stop cycle's
    # WORKSPACE_STOPPED event carries it, then it is cleared. Any request clears it too.
    stop_reason = models.JSONField(default=dict, blank=True)
    # The port the workspace's app listens on (manifest ``app``; allocated from
    # WORKSPACE_APP_PORTS unless the manifest fixes it), passed as WORKSPACE_APP_PORT. Null: the
    # template declares no app, so the workspace has no route and no url.
    app_port = models.IntegerField(null=True, blank=True)
    # When the restart policy restarts the workspace (its instance died while wanted running);
    # null when no restart is pending. Any request clears it.
    restart_at = models.DateTimeField(null=True, blank=True)
    # Opaque to the platform: what the backend needs to find its instance again.
    backend_state = models.JSONField(default=dict, blank=True)
    # The process backend's isolation: the uid (and gid) the workspace runs as, from
    # WORKSPACE_UID_RANGE; on Docker with DOCKER_NETWORK_MODE=veth, the number of its link.
    # Released when the row is removed (the unique constraint ignores removed rows), so two live
    # workspaces never share one.
    isolation_uid = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # The warm pool (workspaces/services/pools.py): the template whose pool this row is an
    # unclaimed member of, "" for every workspace of a person. A member runs its agent, waiting,
    # with no identity, token or env; it is owned by the platform's pool user, hidden from every
    # user-facing list, and counts against no quota nor the provisioning cap. A claim empties it.
    pool = models.CharField(max_length=100, blank=True, default="", editable=False)
    # The template's fingerprint (manifest, files, image) when the member was made: a member whose
    # template changed since is never claimed, and the pool sweep retires it.
    pool_fingerprint = models.CharField(max_length=64, blank=True, default="", editable=False)
    # Set by a claim, cleared by the cycle that begins next: that cycle hands the waiting agent
    # its identity, token and env instead of starting an instance (or starts one cold when the
    # member cannot take it). A redelivered cycle therefore never hands a member over twice.
    claim_pending = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=WorkspaceStatus.values), name="workspace_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(desired_state__in=DesiredState.values),
                name="workspace_desired_state_valid",
            ),
            # The database cannot say "online" while it says "not running" (and vice versa).
            models.CheckConstraint(
                condition=~Q(status__in=sorted(RUNNING_STATUSES))
                | Q(is_running=True, last_started_at__isnull=False),
                name="workspace_running_statuses_are_running",
            ),
            models.CheckConstraint(
                condition=~Q(status__in=sorted(NOT_RUNNING_STATUSES)) | Q(is_running=False),
                name="workspace_stopped_statuses_are_not_running",
            ),
            models.CheckConstraint(
                condition=Q(handled_seq__lte=F("requested_seq")),
                name="workspace_handled_seq_not_ahead",
            ),
            # While workspaces share the host's network (process backend, Docker host mode), two
            # live apps on one port would collide: the database refuses the second.
            models.UniqueConstraint(
                fields=["app_port"],
                condition=Q(app_port__isnull=False) & ~Q(status=WorkspaceStatus.REMOVED),
                name="workspace_app_port_unique_live",
            ),
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=~Q(status=WorkspaceStatus.REMOVED),
                name="workspace_name_unique_per_owner",
            ),
            models.UniqueConstraint(
                fields=["isolation_uid"],
                condition=~Q(status=WorkspaceStatus.REMOVED) & Q(isolation_uid__isnull=False),
                name="workspace_uid_unique_live",
            ),
        ]
        indexes = [
            # The stuck-provisioning sweep:
            #   SELECT ... FROM workspaces_workspace
            #   WHERE status = 'provisioning' AND provisioning_started_at < %s
            # Only rows in flight are in this index, so the sweep's cost grows with them.
            models.Index(
                fields=["provisioning_started_at"],
                condition=Q(status=WorkspaceStatus.PROVISIONING),
                name="ws_provisioning_inflight",
            ),
            # The redrive sweep: WHERE requested_seq > handled_seq (a pending intent).
            models.Index(
                fields=["updated_at"],
                condition=Q(requested_seq__gt=F("handled_seq")),
                name="ws_pending_intent",
            ),
            # The idle sweep (provisioning/idle.py, idle_candidates_query):
            #   SELECT ... FROM workspaces_workspace
            #   WHERE status IN ('degraded', 'offline', 'online') AND last_activity_at <= %s
            #   ORDER BY last_activity_at, id
            # Only rows that can be running are in it, and the cutoff (the shortest idle timeout
            # of any template) keeps the scan to rows that are idle already.
            models.Index(
                fields=["last_activity_at", "id"],
                condition=Q(status__in=sorted(IDLE_STOPPABLE_STATUSES)),
                name="ws_idle_candidates",
            ),
            # The redrive sweep's second query: WHERE restart_at <= now (a restart that is due).
            models.Index(
                fields=["restart_at"],
                condition=Q(restart_at__isnull=False),
                name="ws_restart_pending",
            ),
            # The claim (services.pools.claim_member), under the create's transaction:
            #   SELECT ... WHERE pool = %s AND pool_fingerprint = %s AND status = 'provisioning'
            #   AND is_running AND handled_seq = requested_seq ... ORDER BY created_at
            #   LIMIT 1 FOR UPDATE SKIP LOCKED
            # Only members are in it: its size is the pools', not the table's.
            models.Index(
                fields=["pool", "created_at"], condition=~Q(pool=""), name="ws_pool_members"
            ),
            models.Index(fields=["owner", "-created_at"], name="ws_owner_created"),
            models.Index(fields=["status"], name="ws_status"),
            # The proxy's check on every request: ``access.workspace_for_host``.
            models.Index(
                fields=["subdomain", "created_at"],
                condition=~Q(status=WorkspaceStatus.REMOVED),
                name="ws_live_host",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    @property
    def has_pending_intent(self) -> bool:
        return self.requested_seq > self.handled_seq


class WorkspaceEvent(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="events")
    type = models.CharField(max_length=64, choices=EventType.choices)
    source = models.CharField(max_length=32, choices=EventSource.choices)
    generation = models.BigIntegerField()
    payload = models.JSONField(default=dict, blank=True)
    # Who asked for what this event records (see ``workspaces.audit``).
    actor = models.CharField(max_length=150, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(type__in=EventType.values), name="workspace_event_type_valid"
            ),
            models.CheckConstraint(
                condition=Q(source__in=EventSource.values), name="workspace_event_source_valid"
            ),
        ]
        indexes = [models.Index(fields=["workspace", "id"], name="ws_event_workspace_id")]

    def __str__(self) -> str:
        return f"{self.type} ({self.source}) gen {self.generation}"


class AgentToken(models.Model):
    """A workspace agent's bearer token, stored as its SHA-256 only.

    One token per workspace, of its current generation: it authenticates that workspace in that
    cycle and nothing else; a new cycle replaces it in place, and the old one stops working.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="tokens")
    generation = models.BigIntegerField()
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # The cycle's begin replaces the row in one upsert on this constraint.
            models.UniqueConstraint(fields=["workspace"], name="agent_token_one_per_workspace")
        ]

    def __str__(self) -> str:
        return f"token for {self.workspace_id} gen {self.generation}"


class ApiToken(models.Model):
    """A user's API token (``Authorization: Token <key>``), stored as its SHA-256 only.

    The key is 160 random bits, so a plain SHA-256 is as good as a slow hash here and lets the
    lookup be one indexed equality. The key is shown once, when it is issued.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        # A fingerprint of the digest, never the key.
        return f"token {self.digest[:8]}… of user {self.user_id}"


class Lock(models.Model):
    """A named row that serialises one kind of count-then-write across transactions: a
    transaction that must see every other one's rows before it writes its own locks the row
    (``locks.hold``) and keeps it until it ends."""

    name = models.CharField(primary_key=True, max_length=64)

    def __str__(self) -> str:
        return f"lock {self.name}"


def event_payload(**values: Any) -> dict[str, Any]:
    """Drop ``None`` values so payloads stay small and stable."""
    return {key: value for key, value in values.items() if value is not None}
