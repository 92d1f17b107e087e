"""Warm pools in the domain, without workers: the manifest's `pool` and its override, and the
rules that keep a member nobody's (hidden, outside every limit and sweep) until its claim. The
claims themselves, with real agents, are tests/test_pools_e2e.py and its Docker twin."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from provisioning.sweeper import in_flight_query
from tests.conftest import client_for
from workspaces import selectors, services
from workspaces.manifests import invalidate_templates, load_templates, pool_size, templates
from workspaces.models import Workspace
from workspaces.services import pools
from workspaces.services.claims import ready_members
from workspaces.services.limits import in_flight
from workspaces.status import WorkspaceStatus

pytestmark = pytest.mark.django_db
S = WorkspaceStatus


def _write(directory: Path, name: str, text: str) -> None:
    (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / name / "config.yaml").write_text(text)


@pytest.mark.parametrize(
    ("pool", "field"),
    [
        ("pool: 3", "pool"),
        ("pool: {size: -1}", "pool.size"),
        ("pool: {size: many}", "pool.size"),
        ("pool: {size: 2, warm: true}", "pool.warm"),
        ('pool: {size: 2}\ncommand: ["sh"]', "pool"),
    ],
)
def test_a_bad_pool_is_refused_naming_its_field(tmp_path: Path, pool: str, field: str) -> None:
    _write(tmp_path, "bad", f"runtime: shell\n{pool}\n")
    loaded = load_templates(tmp_path)
    assert loaded.get("bad") is None
    assert [error.field for error in loaded.errors] == [field]


def test_the_size_comes_from_the_manifest_unless_the_setting_says(
    tmp_path: Path, settings: Any
) -> None:
    _write(tmp_path, "warm", "runtime: shell\npool: {size: 4}\n")
    _write(tmp_path, "plain", "runtime: shell\n")
    settings.WORKSPACE_TEMPLATES_DIR = tmp_path
    invalidate_templates()
    warm, plain = templates().get("warm"), templates().get("plain")
    assert warm is not None and plain is not None
    assert (pool_size(warm), pool_size(plain)) == (4, 0)
    settings.WORKSPACE_POOL_SIZES = {"warm": 0, "plain": 2}
    assert (pool_size(warm), pool_size(plain)) == (0, 2)
    invalidate_templates()


def test_a_changed_file_changes_the_fingerprint(tmp_path: Path) -> None:
    _write(tmp_path, "warm", "runtime: shell\npool: {size: 1}\n")
    before = load_templates(tmp_path).templates["warm"].fingerprint
    (tmp_path / "warm" / "profile.sh").write_text("export X=1\n")
    after = load_templates(tmp_path).templates["warm"].fingerprint
    assert before and after and before != after


@pytest.fixture
def member(make_row: Any, templates_dir: Path, settings: Any) -> Workspace:
    """A ready member of shell-default's pool (as its finished cycle leaves it)."""
    settings.WORKSPACE_POOL_SIZES = {"shell-default": 1}
    template = templates().get("shell-default")
    assert template is not None
    row = make_row(
        age=timedelta(hours=5),
        name="pool-abc",
        pool="shell-default",
        pool_fingerprint=template.fingerprint,
        is_running=True,
    )
    Workspace.objects.filter(id=row.id).update(owner=pools.pool_owner(), subdomain="")
    row.refresh_from_db()
    assert Workspace.objects.filter(ready_members(template, "process"), id=row.id).exists()
    return row


def test_a_member_is_nobodys(member: Workspace, make_user: Any) -> None:
    staff = make_user("root", staff=True)
    assert not selectors.visible_workspaces(staff).filter(id=member.id).exists()
    assert client_for(staff).get(f"/api/workspaces/{member.id}/").status_code == 404
    assert not pools.pool_owner().is_active
    # Outside the provisioning cap and the stuck-provisioning sweep, though it is provisioning.
    assert not Workspace.objects.filter(in_flight(), id=member.id).exists()
    assert member.id not in {row[0] for row in in_flight_query(member.updated_at)}


def test_a_create_claims_the_member_and_a_second_starts_cold(
    member: Workspace, user: Any, other_user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        first = services.create_workspace(
            owner=user, name="one", template="shell-default", env={"K": "v"}
        )
        second = services.create_workspace(owner=other_user, name="two", template="shell-default")
    assert first.id == member.id
    claimed = Workspace.objects.get(id=member.id)
    assert (claimed.owner_id, claimed.pool, claimed.claim_pending) == (user.id, "", True)
    assert claimed.env.reveal() == {"K": "v"}
    assert claimed.requested_seq == claimed.handled_seq + 1  # an intent for the hand-over
    assert second.id != member.id and second.pool == ""


def test_a_member_of_an_older_template_is_not_claimed(
    member: Workspace, user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    Workspace.objects.filter(id=member.id).update(pool_fingerprint="older")
    with django_capture_on_commit_callbacks(execute=False):
        made = services.create_workspace(owner=user, name="one", template="shell-default")
    assert made.id != member.id
    assert Workspace.objects.get(id=member.id).pool == "shell-default"


def test_the_claim_takes_its_member_in_one_locking_query(
    member: Workspace, user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with (
        django_capture_on_commit_callbacks(execute=False),
        CaptureQueriesContext(connection) as queries,
    ):
        services.create_workspace(owner=user, name="one", template="shell-default")
    locking = [q["sql"] for q in queries if "SKIP LOCKED" in q["sql"]]
    assert len(locking) == 1, locking
