"""Invariant 7: one status enum; the CHECK constraint and the transition table agree with it."""

from __future__ import annotations

import ast
import re
import uuid
from pathlib import Path

import pytest
from django.db import IntegrityError, connection, transaction

from workspaces.models import Workspace
from workspaces.status import TRANSITIONS, EventType, WorkspaceStatus


def _check_values(constraint: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", [constraint]
        )
        row = cursor.fetchone()
    assert row is not None, f"constraint {constraint} is missing from the database"
    return set(re.findall(r"'([^']+)'", row[0]))


@pytest.mark.django_db
def test_database_check_constraint_lists_exactly_the_enum() -> None:
    assert _check_values("workspace_status_valid") == set(WorkspaceStatus.values)


@pytest.mark.django_db
def test_event_type_constraint_lists_exactly_the_enum() -> None:
    assert _check_values("workspace_event_type_valid") == set(EventType.values)


def test_transition_table_covers_exactly_the_enum() -> None:
    assert set(TRANSITIONS) == set(WorkspaceStatus)
    sources = set().union(*TRANSITIONS.values())
    assert sources <= set(WorkspaceStatus)
    # Nothing leaves removed; removed is reached only through removing.
    assert all(WorkspaceStatus.REMOVED not in allowed for allowed in TRANSITIONS.values())
    assert TRANSITIONS[WorkspaceStatus.REMOVED] == {WorkspaceStatus.REMOVING}


def status_literals(source: str) -> list[str]:
    """Where ``source`` compares a status with, or passes a status keyword, a string literal that
    is a status value: ``status == "online"``, ``status in ("online", …)``,
    ``filter(status="online")``, ``filter(status__in=["online", …])`` (list, tuple or set)."""
    values = set(WorkspaceStatus.values)

    def is_status_literal(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in values

    def with_elements(nodes: list[ast.AST]) -> list[ast.AST]:
        return [
            *nodes,
            *(
                element
                for node in nodes
                if isinstance(node, (ast.Tuple, ast.List, ast.Set))
                for element in node.elts
            ),
        ]

    found = []
    for node in ast.walk(ast.parse(source)):
        suspects: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            suspects = with_elements([node.left, *node.comparators])
        elif isinstance(node, ast.keyword) and (node.arg or "").startswith("status"):
            suspects = with_elements([node.value])
        if any(is_status_literal(item) for item in suspects):
            found.append(str(getattr(node, "lineno", "?")))
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        'row.status == "online"',
        '"failed" != row.status',
        'row.status in ("online", "degraded")',
        'row.status not in ["stopped"]',
        'row.status in {"removed"}',
        'Workspace.objects.filter(status="online")',
        'Workspace.objects.filter(status__in=["online", "degraded"])',
        'Workspace.objects.exclude(status__in=("removed",))',
        'transition(status_to="stopping")',
    ],
)
def test_the_literal_guard_catches_every_form(snippet: str) -> None:
    assert status_literals(f"x = {snippet}\n"), snippet


def test_the_literal_guard_passes_the_enum() -> None:
    source = "x = Workspace.objects.filter(status__in=[S.ONLINE, S.DEGRADED], name='online')\n"
    assert status_literals(source) == []


def test_no_status_string_literals_outside_the_enum() -> None:
    """Status strings live in status.py only: a literal compared with, or assigned to, a status
    elsewhere in the code is drift waiting to happen."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    scanned = 0
    for package in ("workspaces", "provisioning", "portal", "project"):
        for path in (root / package).rglob("*.py"):
            if path.name == "status.py" or "migrations" in path.parts:
                continue
            scanned += 1
            for line in status_literals(path.read_text()):
                offenders.append(f"{path.relative_to(root)}:{line}")
    assert scanned > 20
    assert not offenders, "status literals outside workspaces/status.py: " + ", ".join(offenders)


@pytest.mark.django_db
def test_raw_sql_write_of_an_unknown_status_is_rejected(user) -> None:
    workspace = Workspace.objects.create(
        owner=user, name="w", template="shell-default", runtime="shell", backend="process"
    )
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE workspaces_workspace SET status = 'starting' WHERE id = %s", [workspace.id]
        )


@pytest.mark.django_db
@pytest.mark.parametrize("status", [WorkspaceStatus.ONLINE, WorkspaceStatus.DEGRADED])
def test_database_refuses_online_while_not_running(user, status) -> None:
    """The seed failure: the row may never say online while it says not running."""
    workspace = Workspace.objects.create(
        owner=user, name="w", template="shell-default", runtime="shell", backend="process"
    )
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE workspaces_workspace SET status = %s, is_running = false WHERE id = %s",
            [status.value, workspace.id],
        )


@pytest.mark.django_db
def test_database_refuses_stopped_while_running(user) -> None:
    workspace = Workspace.objects.create(
        owner=user, name="w", template="shell-default", runtime="shell", backend="process"
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        Workspace.objects.filter(id=workspace.id).update(
            status=WorkspaceStatus.STOPPED, is_running=True
        )


@pytest.mark.django_db
def test_unknown_id_lookup_is_not_an_error() -> None:
    assert not Workspace.objects.filter(id=uuid.uuid4()).exists()
