"""Who asked: the ``actor`` recorded on events and on the workspace's latest request.

An actor is a short string, one of:

* ``user:<username>``: a user through the API or the dashboard;
* ``admin:<username>``: staff through the Django admin (also written to the admin log);
* ``manage.py`` (``manage.py:<os user>`` when known): the command line;
* ``beat``: a scheduled sweep (stuck provisioning, liveness, redrive);
* ``reconciler``: a reconciliation pass repairing drift;
* ``agent``: the workspace's own agent (registration, heartbeats).

Cycle events (``WORKSPACE_PROVISIONING``, ``WORKSPACE_STOPPED``, ...) carry the actor of the
request they answer, read from ``Workspace.requested_by`` when the event is recorded.
"""

from __future__ import annotations

import getpass
from typing import Any

from workspaces.status import EventSource

BEAT = "beat"
RECONCILER = "reconciler"
AGENT = "agent"
SYSTEM = "system"

# Events whose source says who acted, whatever the latest request was.
SOURCE_ACTORS: dict[str, str] = {
    EventSource.AGENT: AGENT,
    EventSource.RECONCILER: RECONCILER,
    EventSource.PROVISION_TIMEOUT_SWEEP: BEAT,
    EventSource.LIVENESS: BEAT,
}


def user(account: Any) -> str:
    return f"user:{getattr(account, 'username', '') or account.pk}"


def admin(account: Any) -> str:
    return f"admin:{getattr(account, 'username', '') or account.pk}"


def manage_py() -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        return "manage.py"
    return f"manage.py:{who}"
