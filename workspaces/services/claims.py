"""The claim: a create served by a warm pool's member (see ``services.pools`` for the pools).

A create that the pool can serve takes one member **in its own transaction**: the row is locked
``FOR UPDATE SKIP LOCKED`` (two creates never wait on, nor get, one member) and becomes the
person's workspace in one UPDATE: owner, name, env, a team's parent, ``pool`` emptied,
``claim_pending`` set, a new intent. A single create and every workspace of a team create (the
parent and each member, each from its own template's pool) claim the same way. The cycle that
answers the intent (``provisioning.lifecycle``) hands the waiting agent its identity, token and
env; the row is never a member again, so a member is used once.
"""

from __future__ import annotations

import functools
import logging
import time

from celery import current_app
from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from workspaces import metrics
from workspaces.access import subdomain
from workspaces.manifests import Template, pool_size
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.services.common import InvalidInput, _enqueue_converge
from workspaces.status import DesiredState, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus

# The engine's task that sweeps one template's pool now (provisioning.pools), sent by name.
REFILL_TASK = "provisioning.refill_pool"


def ready_members(template: Template, backend: str) -> Q:
    """Members that can be claimed now: of this template as it is now (a member made from an
    older manifest, files or image never is), on this backend, wanted running, their cycle done,
    their instance running and its agent waiting."""
    return Q(
        pool=template.name,
        pool_fingerprint=template.fingerprint,
        backend=backend,
        status=S.PROVISIONING,
        desired_state=DesiredState.RUNNING,
        is_running=True,
        handled_seq=F("requested_seq"),
    )


def handovers_pending(template_name: str) -> bool:
    """Whether a create claimed a member of ``template_name``'s pool whose hand-over cycle has
    not begun yet (the claim's flag stays until it does). Served by the partial index of rows
    with a pending intent, which every claim has."""
    return Workspace.objects.filter(
        requested_seq__gt=F("handled_seq"), claim_pending=True, template=template_name
    ).exists()


def last_claim_key(template_name: str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:pool:{template_name}:last-claim"


def refill_pending_key(template_name: str) -> str:
    return f"{settings.GATE_KEY_PREFIX}:pool:{template_name}:refill-pending"


def send_refill(template_name: str) -> None:
    """After a claim's commit: note when the pool was last claimed and, unless a refill is
    pending already, ask the engine for one ``POOL_REFILL_DELAY_SECONDS`` from now (the task
    waits on while claims keep coming: ``provisioning.pools.refill_after_claims``). A broker or
    Redis that cannot take it is logged: the beat sweep refills the pool later anyway."""
    delay = float(settings.POOL_REFILL_DELAY_SECONDS)
    try:
        redis = get_redis()
        redis.set(last_claim_key(template_name), f"{time.time():.6f}", ex=3600)
        if redis.set(refill_pending_key(template_name), "1", nx=True, ex=300):
            current_app.send_task(REFILL_TASK, (template_name,), countdown=delay)
    except (BrokerError, RedisError, OSError) as exc:
        logger.warning("could not enqueue the refill of pool %s: %s", template_name, exc)


def claim_member(
    *,
    owner: User,
    name: str,
    manifest: Template,
    env: dict[str, str],
    backend: str,
    actor: str,
    parent: Workspace | None = None,
) -> Workspace | None:
    """Turn a ready member of ``manifest``'s pool into ``owner``'s workspace ``name`` (a member of
    the team ``parent`` when given), inside the caller's transaction; None when the pool cannot
    serve this create (empty or off, or the env lacks what the template requires: that create
    starts cold and fails its preflight as always, and the member stays for someone else).

    The row then holds what ``_insert_workspace`` would have written from the create; what does
    not depend on who asks (template, runtime, sandbox, backend, uid, app port, the instance's
    state) is the member's already."""
    if pool_size(manifest) <= 0:
        return None
    if any(not env.get(key) for key in manifest.required_env):
        return None
    # SKIP LOCKED: a member another create is claiming right now is passed over, never waited
    # for and never taken twice; the second create takes the next one or starts cold.
    member = (
        Workspace.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(ready_members(manifest, backend))
        .order_by("created_at")
        .values_list("id", flat=True)
        .first()
    )
    if member is None:
        return None
    now = timezone.now()
    try:
        with transaction.atomic():  # a savepoint: a name clash leaves the member a member
            changed = Workspace.objects.filter(id=member, pool=manifest.name).update(
                owner=owner,
                name=name,
                subdomain=subdomain(name, owner.username),
                env=env,
                parent=parent,
                pool="",
                claim_pending=True,
                requested_seq=F("requested_seq") + 1,
                requested_by=actor,
                created_at=now,
                updated_at=now,
                # The member has been provisioning since its own start; the workspace since now
                # (the admin's and manage.py's "in state" read it).
                status_changed_at=now,
                last_activity_at=now,
                provisioning_started_at=now,
            )
    except IntegrityError as exc:
        if "workspace_name_unique_per_owner" in str(exc):
            raise InvalidInput("name", f"you already have a workspace named {name!r}") from None
        raise
    if changed != 1:
        return None
    _enqueue_converge(member)
    # Refill at once: the next create should find a member too.
    transaction.on_commit(functools.partial(send_refill, manifest.name))
    transaction.on_commit(
        metrics.POOL_CLAIMS.labels(template=manifest.name, backend=backend).inc, robust=True
    )
    logger.info(
        "claimed pool member %s of %s%s",
        member,
        manifest.name,
        "" if parent is None else f" for team {parent.id}",
    )
    return Workspace.objects.select_related("owner").get(id=member)
