"""The statements the ORM cannot say that run per unit of time, as literal SQL, each with why.
Everything else goes through the ORM."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.db import connection

# A heartbeat (every agent, every HEARTBEAT_INTERVAL_SECONDS) authenticates and records itself in
# one round trip: QuerySet.update can neither join the token's table (UPDATE ... FROM) nor return
# the generation it matched (RETURNING). Parameters: the clocks, the token's digest, the
# workspace id, the status the beat confirms.
_BEAT = """
    UPDATE "workspaces_workspace" AS w SET {clocks}
    FROM "workspaces_agenttoken" AS t
    WHERE t."token_hash" = %s AND w."id" = %s AND t."workspace_id" = w."id"
      AND w."generation" = t."generation" AND w."status" = %s
    RETURNING w."generation"
"""
BEAT = _BEAT.format(clocks='"last_heartbeat_at" = %s')
BEAT_ACTIVE = _BEAT.format(clocks='"last_heartbeat_at" = %s, "last_activity_at" = %s')


def beat(
    token_hash: str, workspace_id: UUID, status: str, now: datetime, active: bool
) -> int | None:
    """Move the heartbeat clocks (and, when ``active``, the activity clock) of the workspace whose
    current cycle's token has this digest, if it is at ``status``; the generation, or None when
    nothing matched."""
    with connection.cursor() as cursor:
        if active:
            cursor.execute(BEAT_ACTIVE, [now, now, token_hash, str(workspace_id), status])
        else:
            cursor.execute(BEAT, [now, token_hash, str(workspace_id), status])
        row = cursor.fetchone()
    return None if row is None else int(row[0])
