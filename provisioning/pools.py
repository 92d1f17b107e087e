"""The warm pools' sweep: keep each template's pool at its size with members that can be claimed.

Beat runs it every ``POOL_SWEEP_INTERVAL_SECONDS``, a claim asks for one pool's at once (the task
``provisioning.refill_pool``), the reconciler's pass runs it after its repairs, and
``manage.py refill_pools`` runs it now. One pass, per template:

1. **Retire** what must not be claimed: members made from an older manifest, files or image (the
   claim's query skips them already), members that failed, members whose instance the backend no
   longer runs (one listing per pass: a dead member is replaced, not claimed), members of a
   template that is gone, and members beyond a size that shrank. Retiring is an ordinary removal
   (its own cycle under the gate), by compare-and-set on ``pool``: a member claimed meanwhile is
   someone's workspace and is left alone.
2. **Refill**: insert the members the pool lacks; each is provisioned by an ordinary cycle.

Nothing here touches a member's instance itself: every change is a cycle under the member's gate,
fenced by its generation, like any workspace's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from django.conf import settings
from redis.exceptions import RedisError

from provisioning.backends import backend_named
from provisioning.backends.base import BackendError
from workspaces.manifests import Template, pool_size, pooled_templates, templates
from workspaces.redis_client import get_redis
from workspaces.services import claims, pools
from workspaces.status import DesiredState, WorkspaceStatus

logger = logging.getLogger(__name__)
S = WorkspaceStatus


@dataclass
class PoolReport:
    template: str
    size: int
    made: int = 0
    retired: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        retired = ", ".join(f"{why} {n}" for why, n in sorted(self.retired.items())) or "none"
        return f"{self.template}: size {self.size}, made {self.made}, retired {retired}"


def _running_instances() -> dict[str, str] | None:
    """The instances the backend runs now, by workspace id, with the id of the image each runs
    ("" where the backend has none), in one listing; None when it cannot be asked (then no
    member is judged dead, nor outdated, on a guess)."""
    try:
        listed = backend_named(settings.WORKSPACE_BACKEND).list_instances()
    except BackendError as exc:
        logger.warning("pool sweep: the backend cannot list its instances: %s", exc)
        return None
    return {info.workspace_id: info.image for info in listed if info.running}


def _launch_image(template: Template | None) -> str | None:
    """The image id a new member of ``template`` would run (None: not known, not compared)."""
    if template is None:
        return None
    try:
        return backend_named(settings.WORKSPACE_BACKEND, check=False).launch_image_id(template)
    except BackendError as exc:
        logger.warning("pool sweep: cannot tell %s's image: %s", template.name, exc)
        return None


def _why_retire(
    row: Mapping[str, Any],
    fingerprint: str | None,
    running: dict[str, str] | None,
    image: str | None,
) -> str:
    if fingerprint is None:
        return "template gone"
    if row["pool_fingerprint"] != fingerprint:
        return "template changed"
    if row["status"] == S.FAILED:
        return "failed"
    ready = row["status"] == S.PROVISIONING and row["is_running"]
    done = row["requested_seq"] == row["handled_seq"]
    if ready and done and running is not None:
        if str(row["id"]) not in running:
            return "died"
        # A base image rebuilt under its tag: the member runs what the template no longer does.
        runs = running[str(row["id"])]
        if image is not None and runs and runs != image:
            return "image changed"
    return ""


# A refill waits for a burst's hand-overs to begin for at most this long after its latest claim:
# a claim whose cycle never begins (no worker takes it) must not keep the pool empty.
HANDOVER_WAIT_LIMIT_SECONDS = 30.0
HANDOVER_POLL_SECONDS = 0.2


def claim_quiet_for(template_name: str) -> float:
    """Seconds to wait before the template's pool is refilled (0 or less: it may be now): until
    ``POOL_REFILL_DELAY_SECONDS`` have passed since its latest claim, and then while any of its
    claims still waits for the cycle that hands it over. The replacements' starts would take the
    CPU those hand-overs need: a burst's cycles queue for the workers long after its requests
    were answered."""
    try:
        last = cast(bytes | None, get_redis().get(claims.last_claim_key(template_name)))
    except RedisError:
        return 0.0  # no record to go by: refill rather than leave the pool empty
    if last is None:
        return 0.0
    since = time.time() - float(last)
    wait = float(settings.POOL_REFILL_DELAY_SECONDS) - since
    if wait > 0:
        return wait
    if since < HANDOVER_WAIT_LIMIT_SECONDS and claims.handovers_pending(template_name):
        return HANDOVER_POLL_SECONDS
    return wait


def refill_after_claims(template_name: str) -> list[PoolReport] | float:
    """The refill a claim asked for: the sweep of that pool once its claims have paused, or the
    seconds left to wait (the task comes back then). Claims that arrive meanwhile do not send
    another (their pending mark is this one's); once it runs, the next claim sends a new one."""
    wait = claim_quiet_for(template_name)
    if wait > 0.01:
        return wait
    get_redis().delete(claims.refill_pending_key(template_name))
    return sweep(template_name)


def sweep(template_name: str | None = None) -> list[PoolReport]:
    """One pass over every pool (or ``template_name``'s alone)."""
    backend = settings.WORKSPACE_BACKEND
    # A backend that cannot hand a member over (Swarm) gets no members: creates start cold.
    try:
        if not backend_named(backend, check=False).keeps_pools:
            return []
    except BackendError as exc:
        logger.warning("pool sweep: backend %s: %s", backend, exc)
        return []
    current = {t.name: t for t in pooled_templates()}
    rows = list(
        pools.members()
        .filter(backend=backend)
        .exclude(desired_state=DesiredState.REMOVED)
        .order_by("created_at")
        .values(
            "id",
            "pool",
            "pool_fingerprint",
            "status",
            "is_running",
            "requested_seq",
            "handled_seq",
        )
    )
    names = set(current) | {row["pool"] for row in rows}
    if template_name is not None:
        names &= {template_name}
    running = _running_instances() if rows else {}
    reports: list[PoolReport] = []
    for name in sorted(names):
        template = templates().get(name)
        size = pool_size(template) if template is not None else 0
        report = PoolReport(name, size)
        fingerprint = template.fingerprint if template is not None else None
        kept: list[Mapping[str, Any]] = []
        mine = [r for r in rows if r["pool"] == name]
        image = _launch_image(template) if mine else None
        for row in mine:
            why = _why_retire(row, fingerprint, running, image)
            if not why:
                kept.append(row)
            elif pools.retire_member(row["id"], name, why):
                report.retired[why] = report.retired.get(why, 0) + 1
        # A smaller size: the newest go first (the oldest are the likeliest ready).
        for row in reversed(kept[size:]):
            if pools.retire_member(row["id"], name, "pool shrunk"):
                report.retired["pool shrunk"] = report.retired.get("pool shrunk", 0) + 1
        # During a burst of claims the refill waits (refill_after_claims brings it after).
        if template is not None and size > 0 and claim_quiet_for(name) <= 0:
            report.made = len(pools.refill(template, backend).made)
        if report.made or report.retired:
            logger.info("pool sweep: %s", report.line())
        reports.append(report)
    return reports
