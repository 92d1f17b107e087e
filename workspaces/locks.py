"""Named locks held until the transaction ends: a row of ``Lock`` taken ``FOR UPDATE``. Every
caller of one name queues behind the transaction that holds it."""

from __future__ import annotations

from workspaces.models import Lock

# The admission of cycles against PROVISIONING_CONCURRENCY_LIMIT (services.limits).
ADMISSION = "provisioning_admission"
# The allocation of WORKSPACE_UID_RANGE uids, and the single-owner rule of unisolated
# development (services.isolation).
UIDS = "uids"


def hold(name: str) -> None:
    """Lock ``name`` until the caller's transaction ends (call it inside one). The row is made on
    first use; two first users race on its primary key, and the loser then waits on the lock."""
    Lock.objects.select_for_update().get_or_create(name=name)
