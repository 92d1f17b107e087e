"""The liveness sweep: an online or degraded workspace whose agent went silent becomes offline.

Each flip is a compare-and-set on status, generation and the ``last_heartbeat_at`` the sweep read
(``services.mark_missed_heartbeats``), so a heartbeat that lands meanwhile wins and the row stays
online. The agent's next heartbeat brings an offline workspace back (``services.record_heartbeat``);
a removed workspace is never revived (its agent's calls are refused).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from workspaces import services
from workspaces.models import Workspace
from workspaces.status import RUNNING_STATUSES, WorkspaceStatus

logger = logging.getLogger(__name__)
BATCH = 1000


def sweep_missed_heartbeats(
    *, now: datetime | None = None, window_seconds: int | None = None
) -> list[UUID]:
    """Flip the silent workspaces to offline; returns their ids."""
    window = int(window_seconds or settings.LIVENESS_WINDOW_SECONDS)
    cutoff = (now or timezone.now()) - timedelta(seconds=window)
    # Served by the ws_status index: the rows read are the online/degraded ones, not the table.
    silent = (
        Workspace.objects.filter(status__in=sorted(RUNNING_STATUSES))
        .filter(Q(last_heartbeat_at__lt=cutoff) | Q(last_heartbeat_at__isnull=True))
        .order_by("last_heartbeat_at")
        .values_list("id", "generation", "status", "last_heartbeat_at")[:BATCH]
    )
    flipped = []
    for workspace_id, generation, status, last_heartbeat_at in silent:
        if services.mark_missed_heartbeats(
            workspace_id,
            generation,
            previous=WorkspaceStatus(status),
            last_heartbeat_at=last_heartbeat_at,
            window_seconds=window,
        ):
            flipped.append(workspace_id)
    return flipped
