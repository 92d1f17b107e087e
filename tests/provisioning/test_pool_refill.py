"""When a claim's refill runs: after ``POOL_REFILL_DELAY_SECONDS`` of no claims, and once every
claim's hand-over cycle has begun, so that a burst's replacements never take the CPU its
hand-overs need (a burst's cycles queue for the workers well after its requests were
answered)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from provisioning import pools
from workspaces.redis_client import get_redis
from workspaces.services import claims
from workspaces.services.cycles import begin_cycle
from workspaces.status import WorkspaceStatus

pytestmark = pytest.mark.django_db
TEMPLATE = "shell-default"


def _claimed(seconds_ago: float) -> None:
    get_redis().set(claims.last_claim_key(TEMPLATE), f"{time.time() - seconds_ago:.6f}")


@pytest.fixture
def handover(make_row: Any, settings: Any) -> Any:
    """A workspace a create claimed from the pool, its hand-over cycle not begun yet."""
    settings.POOL_REFILL_DELAY_SECONDS = 1.0
    yield make_row(age=timedelta(seconds=1), template=TEMPLATE, pending=True, claim_pending=True)
    get_redis().delete(claims.last_claim_key(TEMPLATE))


def test_the_refill_waits_for_the_delay_after_the_latest_claim(handover: Any) -> None:
    _claimed(0.25)
    assert 0.7 < pools.claim_quiet_for(TEMPLATE) <= 0.75
    assert isinstance(pools.refill_after_claims(TEMPLATE), float)


def test_then_until_every_claims_hand_over_has_begun(handover: Any) -> None:
    _claimed(2.0)
    assert pools.claim_quiet_for(TEMPLATE) == pools.HANDOVER_POLL_SECONDS
    assert pools.refill_after_claims(TEMPLATE) == pools.HANDOVER_POLL_SECONDS
    begin_cycle(handover.id, WorkspaceStatus.PROVISIONING, action="claim")  # clears the flag
    assert not claims.handovers_pending(TEMPLATE)
    assert pools.claim_quiet_for(TEMPLATE) <= 0


def test_but_never_longer_than_the_limit(handover: Any) -> None:
    """A claim whose cycle never begins (no worker takes it) must not keep the pool empty."""
    _claimed(pools.HANDOVER_WAIT_LIMIT_SECONDS + 1)
    assert claims.handovers_pending(TEMPLATE)
    assert pools.claim_quiet_for(TEMPLATE) <= 0


def test_another_templates_hand_overs_do_not_hold_it(handover: Any) -> None:
    _claimed(2.0)
    assert not claims.handovers_pending("jupyterlab")
    get_redis().set(claims.last_claim_key("jupyterlab"), f"{time.time() - 2.0:.6f}")
    try:
        assert pools.claim_quiet_for("jupyterlab") <= 0
    finally:
        get_redis().delete(claims.last_claim_key("jupyterlab"))
