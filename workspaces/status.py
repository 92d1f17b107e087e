"""The one status enum, the one event-type enum and the transition table.

Nothing else in the code base spells a status as a string: the database CHECK constraints are
generated from these enums (see ``models.py``) and ``tests/workspaces/test_status.py`` fails when
the enum, the constraint in the migrated database and this table drift apart.
"""

from __future__ import annotations

from django.db import models


class WorkspaceStatus(models.TextChoices):
    PROVISIONING = "provisioning", "Provisioning"
    ONLINE = "online", "Online"
    DEGRADED = "degraded", "Degraded"
    OFFLINE = "offline", "Offline"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed"
    REMOVING = "removing", "Removing"
    REMOVED = "removed", "Removed"


class DesiredState(models.TextChoices):
    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"
    REMOVED = "removed", "Removed"


class EventType(models.TextChoices):
    PROVISIONING = "WORKSPACE_PROVISIONING", "A cycle began"
    ONLINE = "WORKSPACE_ONLINE", "Online"
    DEGRADED = "WORKSPACE_DEGRADED", "Degraded"
    OFFLINE = "WORKSPACE_OFFLINE", "Offline"
    STOPPED = "WORKSPACE_STOPPED", "Stopped"
    # One type for every provisioning failure; the event's ``source`` says which path failed.
    PROVISION_FAILED = "WORKSPACE_PROVISION_FAILED", "Provisioning failed"
    CONFIG_RECOVERED = "WORKSPACE_CONFIG_RECOVERED", "Config volume recovered"
    REMOVED = "WORKSPACE_REMOVED", "Removed"


class EventSource(models.TextChoices):
    API = "api", "API"
    AGENT = "agent", "Agent"
    PREFLIGHT = "preflight", "Preflight"
    BACKEND = "backend", "Backend"
    LIFECYCLE = "lifecycle", "Lifecycle"
    PROVISION_TIMEOUT_SWEEP = "provision_timeout_sweep", "Provision timeout sweep"
    LIVENESS = "liveness", "Liveness"
    RECONCILER = "reconciler", "Reconciler"
    # The idle auto-stop policy (provisioning/idle.py): the template's idle timeout passed.
    IDLE_STOP = "idle_stop", "Idle stop"
    # The warm pool (provisioning/pools.py): a member retired (template changed, failed, shrunk).
    POOL = "pool", "Warm pool"


S = WorkspaceStatus

# to-status -> the statuses it may be reached from. A write that changes ``status`` goes through
# ``workspaces.services.transition``, which turns this row into ``WHERE status IN (...)``, so the
# database enforces the table at the moment of the write, not a stale read before it.
TRANSITIONS: dict[WorkspaceStatus, frozenset[WorkspaceStatus]] = {
    # A cycle (start / restart / provision) begins from anything still alive.
    S.PROVISIONING: frozenset(
        {S.PROVISIONING, S.ONLINE, S.DEGRADED, S.OFFLINE, S.STOPPING, S.STOPPED, S.FAILED}
    ),
    # The agent registers, or a heartbeat returns after a miss.
    S.ONLINE: frozenset({S.PROVISIONING, S.ONLINE, S.DEGRADED, S.OFFLINE}),
    S.DEGRADED: frozenset({S.ONLINE, S.DEGRADED, S.OFFLINE}),
    S.OFFLINE: frozenset({S.ONLINE, S.DEGRADED, S.OFFLINE, S.PROVISIONING}),
    # Stop is accepted from every live status, including a pending start or a failure.
    S.STOPPING: frozenset(
        {S.PROVISIONING, S.ONLINE, S.DEGRADED, S.OFFLINE, S.STOPPING, S.STOPPED, S.FAILED}
    ),
    S.STOPPED: frozenset({S.STOPPING, S.STOPPED}),
    S.FAILED: frozenset(
        {S.PROVISIONING, S.ONLINE, S.DEGRADED, S.OFFLINE, S.STOPPING, S.FAILED, S.REMOVING}
    ),
    # Delete is accepted from every status but removed; nothing leaves removing but removed.
    S.REMOVING: frozenset(
        {
            S.PROVISIONING,
            S.ONLINE,
            S.DEGRADED,
            S.OFFLINE,
            S.STOPPING,
            S.STOPPED,
            S.FAILED,
            S.REMOVING,
        }
    ),
    S.REMOVED: frozenset({S.REMOVING}),
}

# Statuses in which the backend is expected to be running an instance.
RUNNING_STATUSES = frozenset({S.ONLINE, S.DEGRADED})
# A stopped or removed workspace never has a running instance (a CHECK constraint says so).
NOT_RUNNING_STATUSES = frozenset({S.STOPPED, S.REMOVED})
TERMINAL_STATUSES = frozenset({S.REMOVED})
# Statuses the idle sweep may stop: an instance runs, or was meant to (offline). A workspace still
# provisioning is the stuck-provisioning sweep's business, not the idle policy's.
IDLE_STOPPABLE_STATUSES = frozenset({S.ONLINE, S.DEGRADED, S.OFFLINE})


def allowed_sources(target: WorkspaceStatus) -> frozenset[WorkspaceStatus]:
    return TRANSITIONS[target]


def can_transition(source: WorkspaceStatus | str, target: WorkspaceStatus) -> bool:
    return WorkspaceStatus(source) in TRANSITIONS[target]


def sql_in_list(values: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    """Render values for a CHECK constraint, sorted so migrations are stable."""
    return ", ".join(f"'{value}'" for value in sorted(values))
