"""The redrive sweep: the row is the outbox. It enqueues a pending intent once while that task
waits in the queue (not once per pass), again once the task has started, and never while the
gate is held. Messages are counted in the real broker's queue."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import pytest
from django.conf import settings
from django.utils import timezone

from provisioning import gate
from provisioning.tasks import redrive_pending
from tests.provisioning.test_reconciler import make_row
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.status import WorkspaceStatus

pytestmark = pytest.mark.django_db


def _queued() -> int:
    return int(cast(int, get_redis().llen(settings.CELERY_TASK_DEFAULT_QUEUE)))


@pytest.fixture
def pending(user: Any) -> Iterator[Workspace]:
    workspace = make_row(user, WorkspaceStatus.OFFLINE, is_running=False, pending=True)
    Workspace.objects.filter(id=workspace.id).update(
        updated_at=timezone.now() - timedelta(seconds=settings.REDRIVE_INTERVAL_SECONDS + 5)
    )
    yield workspace
    gate.release_redrive(workspace.id)


def test_a_pending_intent_is_redriven_once_while_its_task_is_queued(pending) -> None:
    before = _queued()
    assert redrive_pending() == 1
    assert redrive_pending() == 0
    assert redrive_pending() == 0
    assert _queued() == before + 1

    gate.release_redrive(pending.id)  # what the converge task does when it starts
    assert redrive_pending() == 1
    assert _queued() == before + 2


def test_the_mark_expires_after_a_few_passes(pending) -> None:
    assert redrive_pending() == 1
    ttl = cast(int, get_redis().ttl(f"{settings.GATE_KEY_PREFIX}:redrive:{pending.id}"))
    assert 0 < ttl <= gate.REDRIVE_CLAIM_PASSES * settings.REDRIVE_INTERVAL_SECONDS


def test_a_held_gate_is_not_redriven(pending) -> None:
    with gate.hold(pending.id, "test"):
        assert redrive_pending() == 0
