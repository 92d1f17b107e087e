"""Warm pools in the domain, without workers: the manifest's `pool` and its override, and the
rules that keep a member nobody's (hidden, outside every limit and sweep) until its claim. The
claims themselves, with real agents, are tests/test_pools_e2e.py and its Docker twin."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from portal.api.serializers import TeamSerializer
from provisioning import lifecycle
from provisioning.sweeper import in_flight_query
from tests.conftest import client_for
from tests.fakes import fake_backend
from tests.support import lifecycle_queue
from workspaces import selectors, services
from workspaces.access import subdomain
from workspaces.manifests import invalidate_templates, load_templates, pool_size, templates
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.services import pools
from workspaces.services.claims import ready_members
from workspaces.services.limits import in_flight
from workspaces.status import EventType, WorkspaceStatus

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


# --- team creates claim too ----------------------------------------------------------------------
TEAM = "team-default"  # claude-code-default, claude-code-reviewer, hermes-default, shell-default x3
KEY = {"ANTHROPIC_API_KEY": "sk-test-not-a-real-key"}


def _ready_members(make_row: Any, template_name: str, count: int, backend: str) -> list[Workspace]:
    """``count`` ready members of ``template_name``'s pool on ``backend``, oldest first (the
    order a claim takes them in)."""
    template = templates().get(template_name)
    assert template is not None
    rows = []
    for index in range(count):
        row = make_row(
            template_name,
            age=timedelta(hours=5),
            name=f"pool-{template_name}-{index}",
            backend=backend,
            pool=template_name,
            pool_fingerprint=template.fingerprint,
            is_running=True,
        )
        Workspace.objects.filter(id=row.id).update(
            owner=pools.pool_owner(),
            subdomain="",
            status_changed_at=row.provisioning_started_at,  # provisioning since its insert
        )
        rows.append(row)
    assert len(_ready_ids(template_name, backend)) == count
    return rows


def _ready_ids(template_name: str, backend: str) -> set[Any]:
    template = templates().get(template_name)
    assert template is not None
    return set(
        Workspace.objects.filter(ready_members(template, backend)).values_list("id", flat=True)
    )


def _member_rows(members: list[Workspace]) -> list[Any]:
    """What a claim changes, as the database has it."""
    return list(
        Workspace.objects.filter(id__in=[member.id for member in members])
        .order_by("id")
        .values(
            "owner_id",
            "name",
            "subdomain",
            "parent_id",
            "pool",
            "claim_pending",
            "requested_seq",
            "requested_by",
            "created_at",
            "updated_at",
        )
    )


@pytest.fixture
def team_pools(templates_dir: Path, settings: Any) -> None:
    """Pools for two of team-default's member templates: two members of shell-default (the team
    lists it three times: the third starts cold) and one of hermes-default."""
    settings.WORKSPACE_POOL_SIZES = {"shell-default": 2, "hermes-default": 1}


def test_a_team_create_claims_members_of_each_members_template(
    team_pools: None, make_row: Any, user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    shells = _ready_members(make_row, "shell-default", 2, "fake")
    [hermes] = _ready_members(make_row, "hermes-default", 1, "fake")
    with django_capture_on_commit_callbacks(execute=False):
        team = services.create_team(
            owner=user, name="squad", template=TEAM, env=KEY, backend="fake", actor="alice"
        )
    by_name = {member.name: member for member in team.members}
    claimed = {
        "squad-shell-default-1": shells[0].id,
        "squad-shell-default-2": shells[1].id,
        "squad-hermes-default": hermes.id,
    }
    assert {name: by_name[name].id for name in claimed} == claimed
    # The rest started cold, as without a pool: the team's parent (a team template keeps no
    # pool), the third shell-default, and the members of templates without a pool.
    member_ids = {shell.id for shell in shells} | {hermes.id}
    assert team.parent.id not in member_ids
    assert len({member.id for member in team.members} - member_ids) == 3
    for name, workspace_id in claimed.items():
        row = Workspace.objects.get(id=workspace_id)
        # What the create's insert would have written: the team's parent above all.
        assert row.parent_id == team.parent.id
        assert (row.owner_id, row.name) == (user.id, name)
        assert row.subdomain == subdomain(name, user.username)
        assert (row.pool, row.claim_pending, row.requested_by) == ("", True, "alice")
        assert row.env.reveal() == KEY
        assert row.requested_seq == row.handled_seq + 1  # an intent for the hand-over
        # New now, as an inserted row is: not five hours in provisioning.
        assert row.created_at == row.provisioning_started_at == row.status_changed_at
    parent = Workspace.objects.get(id=team.parent.id)
    assert set(parent.members.values_list("id", flat=True)) == {m.id for m in team.members}

    # The hand-over records where the workspace came from, as a single create's claim does.
    with fake_backend():
        lifecycle.converge(shells[0].id)
    [began] = WorkspaceEvent.objects.filter(workspace_id=shells[0].id, type=EventType.PROVISIONING)
    assert began.payload["action"] == "claim"
    assert began.payload["claimed_from_pool"] == "shell-default"


def test_a_team_answer_shows_claimed_members_without_a_query(
    team_pools: None, make_row: Any, user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """What POST /api/teams/ answers is read inside the create (``_answerable``): the parent's
    members, claimed ones included, and every owner."""
    shells = _ready_members(make_row, "shell-default", 2, "process")
    with django_capture_on_commit_callbacks(execute=False):
        team = services.create_team(owner=user, name="squad", template=TEAM, env=KEY)
    with CaptureQueriesContext(connection) as queries:
        body = TeamSerializer(team).data
    assert queries.captured_queries == []
    listed = {member["id"] for member in body["parent"]["members"]}
    assert {str(shell.id) for shell in shells} <= listed
    assert listed == {member["id"] for member in body["members"]}
    assert {member["parent"] for member in body["members"]} == {str(team.parent.id)}
    assert {member["owner"] for member in body["members"]} == {user.username}


def test_a_name_clash_in_a_team_leaves_every_member_a_member(
    team_pools: None,
    make_row: Any,
    user: Any,
    api: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    shells = _ready_members(make_row, "shell-default", 2, "process")
    taken = make_row("jupyterlab", age=timedelta(0), name="squad-shell-default-2")
    before = _member_rows(shells)
    # The first shell-default member is claimed, then the second's claim clashes: the whole team
    # goes, that claim included.
    with (
        django_capture_on_commit_callbacks(execute=False) as callbacks,
        pytest.raises(services.InvalidInput) as refused,
    ):
        services.create_team(owner=user, name="squad", template=TEAM, env=KEY)
    assert refused.value.field == "name"
    assert "squad-shell-default-2" in str(refused.value)
    assert callbacks == []  # no converge, no refill for a claim that was undone
    assert _member_rows(shells) == before
    assert all(Workspace.objects.get(id=shell.id).env.reveal() == {} for shell in shells)
    assert list(Workspace.objects.filter(owner=user).values_list("id", flat=True)) == [taken.id]
    # Through the API: the same 400 naming the field.
    response = api.post("/api/teams/", {"name": "squad", "template": TEAM}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()["errors"]
    # The members are still there to claim: once the name is free, the team gets both.
    Workspace.objects.filter(id=taken.id).update(name="elsewhere")
    with django_capture_on_commit_callbacks(execute=False):
        team = services.create_team(owner=user, name="squad", template=TEAM, env=KEY)
    by_name = {member.name: member.id for member in team.members}
    assert [by_name["squad-shell-default-1"], by_name["squad-shell-default-2"]] == [
        shell.id for shell in shells
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "backend",
    [
        # The parent's cold insert takes the uid lock first: the creates queue behind it.
        "process",
        # No uid to allocate: only the claim's row lock stands between the two creates.
        "fake",
    ],
)
def test_concurrent_team_creates_never_share_a_member(
    team_pools: None, make_row: Any, make_user: Any, settings: Any, backend: str
) -> None:
    settings.PROVISIONING_CONCURRENCY_LIMIT = 0  # no admission lock serialises the creates
    shells = {row.id for row in _ready_members(make_row, "shell-default", 3, backend)}
    owners = [make_user("red"), make_user("blue")]
    barrier = threading.Barrier(len(owners))
    made: dict[str, services.Team] = {}
    errors: list[BaseException] = []

    def create(owner: Any) -> None:
        try:
            barrier.wait(timeout=30)
            made[owner.username] = services.create_team(
                owner=owner, name="crew", template=TEAM, env=KEY, backend=backend
            )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    with lifecycle_queue("pools-nobody"):  # the cycles are not this test's
        threads = [threading.Thread(target=create, args=(owner,)) for owner in owners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    ids = {
        username: [team.parent.id, *(member.id for member in team.members)]
        for username, team in made.items()
    }
    assert all(len(set(team)) == 7 for team in ids.values())
    assert not set(ids["red"]) & set(ids["blue"]), "one member became two teams' workspace"
    # Every member was claimed once, and its row says by whom: the owner and the parent of the
    # team whose create returned it.
    assert shells <= set(ids["red"]) | set(ids["blue"])
    for username, team in made.items():
        for member in Workspace.objects.filter(id__in=shells & set(ids[username])):
            assert (member.owner.username, member.parent_id) == (username, team.parent.id)
    assert not pools.members().exists()
