"""``selectors.plan_row``: the lifecycle's read before each cycle. It must give the same values,
the same deferred fields as ``select_related("owner").only(...)``, the owner at hand without a
query."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from workspaces import selectors, services
from workspaces.models import Workspace
from workspaces.status import DesiredState, WorkspaceStatus

pytestmark = pytest.mark.django_db


def test_the_plan_row_is_what_the_orm_reads(user: Any) -> None:
    created = services.create_workspace(owner=user, name="planned", template="shell-default")
    Workspace.objects.filter(id=created.id).update(
        status=WorkspaceStatus.STOPPING,
        desired_state=DesiredState.STOPPED,
        generation=7,
        is_running=True,
        requested_seq=5,
        handled_seq=3,
    )
    orm = (
        Workspace.objects.select_related("owner")
        .only("owner__username", *selectors.PLAN_FIELDS)
        .get(id=created.id)
    )
    with CaptureQueriesContext(connection) as queries:
        row = selectors.plan_row(created.id)
        assert row is not None
        for name in ("id", "owner_id", *selectors.PLAN_FIELDS):
            assert getattr(row, name) == getattr(orm, name), name
            assert type(getattr(row, name)) is type(getattr(orm, name)), name
        assert row.owner.username == user.username == orm.owner.username
        assert row.has_pending_intent == orm.has_pending_intent
    assert len(queries) == 1  # the owner came with the row
    assert row.get_deferred_fields() == orm.get_deferred_fields()
    assert row._state.db == orm._state.db and not row._state.adding
    # A deferred field loads on demand, as on the ORM's instance.
    assert row.template == "shell-default"


def test_no_row_is_none(db: Any) -> None:
    assert selectors.plan_row(uuid.uuid4()) is None
