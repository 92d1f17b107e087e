"""User env is the application's alone: platform, loader and interpreter variables, and values
that cannot travel in an environment (NUL, lone surrogates), are a 400 naming the key, and
nothing is written. Also the isolation rules of the create request itself."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import client_for
from workspaces import services
from workspaces.models import Workspace, WorkspaceEvent

pytestmark = pytest.mark.django_db

DENIED = [
    "AGENT_HEALTH_COMMAND",
    "AGENT_IGNORE_SIGTERM",
    "agent_health_command",
    "WORKSPACE_ID",
    "WORKSPACE_CONFIG_DIR",
    "PLATFORM_URL",
    "PATH",
    "HOME",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_ls",
    "IFS",
    "NODE_OPTIONS",
    "PERL5OPT",
    "GCONV_PATH",
    "JAVA_TOOL_OPTIONS",
]


def _post(api: Any, env: dict) -> Any:
    return api.post(
        "/api/workspaces/",
        {"name": "dev", "template": "shell-default", "env": {"FINE": "ok", **env}},
        format="json",
    )


def _nothing_written() -> None:
    assert not Workspace.objects.exists()
    assert not WorkspaceEvent.objects.exists()


@pytest.mark.parametrize("key", DENIED)
def test_platform_loader_and_interpreter_variables_are_a_400_naming_the_key(api, key) -> None:
    response = _post(api, {key: "id -un"})
    assert response.status_code == 400, response.content
    body = response.json()
    assert "env" in body["errors"], body
    assert key in body["detail"], body
    _nothing_written()


@pytest.mark.parametrize(
    ("raw_value", "what"), [('"a\\u0000b"', "NUL"), ('"a\\ud800b"', "surrogate")]
)
def test_nul_and_lone_surrogate_values_are_a_400_naming_the_key(api, raw_value, what) -> None:
    # Raw JSON: the escapes decode to a NUL and to a lone surrogate inside the server.
    body = f'{{"name": "dev", "template": "shell-default", "env": {{"MY_KEY": {raw_value}}}}}'
    response = api.post("/api/workspaces/", body, content_type="application/json")
    assert response.status_code == 400, response.content
    payload = json.loads(response.content)
    assert "env" in payload["errors"]
    assert "MY_KEY" in payload["detail"]
    assert what in payload["detail"] or "Unicode" in payload["detail"]
    _nothing_written()


def test_ordinary_application_variables_are_accepted(api) -> None:
    env = {"ANTHROPIC_API_KEY": "k", "DATABASE_HOST": "db", "PATHFINDER": "x", "MY_PATH": "/a"}
    response = _post(api, env)
    assert response.status_code == 201, response.content


def test_the_service_itself_refuses_denied_keys() -> None:
    # The admin and manage.py go through the same validation as the API.
    with pytest.raises(services.InvalidInput) as raised:
        services.validate_env({"LD_PRELOAD": "/tmp/x.so"})
    assert raised.value.field == "env" and "LD_PRELOAD" in raised.value.message


@pytest.mark.parametrize(
    ("backend", "network_mode", "holds_uid"),
    [("process", "veth", True), ("docker", "veth", True), ("docker", "workspace", False)],
)
def test_workspaces_get_distinct_uids_from_the_range(
    api, settings, backend: str, network_mode: str, holds_uid: bool
) -> None:
    """Process workspaces run as their uid; Docker workspaces with veth links take the link the
    uid numbers, so two live ones never share an address. Docker networks need none."""
    settings.WORKSPACE_BACKEND = backend
    settings.DOCKER_NETWORK_MODE = network_mode
    ids = []
    for name in ("one", "two", "three"):
        response = api.post(
            "/api/workspaces/", {"name": name, "template": "shell-default"}, format="json"
        )
        assert response.status_code == 201, response.content
        ids.append(response.json()["id"])
    uids = [Workspace.objects.get(id=i).isolation_uid for i in ids]
    if not holds_uid:
        assert uids == [None, None, None]
        return
    low, high = settings.WORKSPACE_UID_RANGE
    assert len(set(uids)) == 3 and all(low <= uid <= high for uid in uids)


def test_a_new_workspace_takes_the_lowest_uid_no_live_workspace_holds(user, settings) -> None:
    """The range's first uid, else the first gap; removed workspaces and uids outside the range
    hold nothing; a full range is refused, naming the setting."""
    from django.db import transaction

    from workspaces.services.isolation import IsolationRefused, allocate_uid

    settings.WORKSPACE_UID_RANGE = (300100, 300104)

    def allocate() -> int:
        with transaction.atomic():
            return allocate_uid()

    def hold(uid: int, status: str = "stopped") -> None:
        Workspace.objects.create(
            owner=user,
            name=f"u{uid}-{status}",
            template="t",
            runtime="shell",
            status=status,
            isolation_uid=uid,
        )

    assert allocate() == 300100
    hold(300099)  # below the range
    hold(300101)
    assert allocate() == 300100  # the first is free though its neighbour is not
    hold(300100)
    hold(300103)
    assert allocate() == 300102  # the first gap
    hold(300102, status="removed")
    assert allocate() == 300102  # a removed workspace's uid is free again
    hold(300102)
    assert allocate() == 300104  # the range's last
    hold(300104)
    hold(300105)  # above the range: not a candidate
    with pytest.raises(IsolationRefused, match="WORKSPACE_UID_RANGE=300100-300104"):
        allocate()


def test_the_database_refuses_one_uid_for_two_live_workspaces(user) -> None:
    from django.db import IntegrityError, transaction

    first = Workspace.objects.create(owner=user, name="x", template="t", runtime="shell")
    first.isolation_uid = 200500
    first.save()
    second = Workspace.objects.create(owner=user, name="y", template="t", runtime="shell")
    with pytest.raises(IntegrityError), transaction.atomic():
        Workspace.objects.filter(id=second.id).update(isolation_uid=200500)
    # Once the first is removed its uid is free.
    Workspace.objects.filter(id=first.id).update(status="removed")
    assert Workspace.objects.filter(id=second.id).update(isolation_uid=200500) == 1


def test_without_isolation_only_one_owner_may_have_process_workspaces(
    api, other_user, settings
) -> None:
    settings.WORKSPACE_BACKEND = "process"
    settings.WORKSPACE_PROCESS_ISOLATION = "none"
    first = api.post("/api/workspaces/", {"name": "a", "template": "shell-default"}, format="json")
    assert first.status_code == 201, first.content
    assert Workspace.objects.get(id=first.json()["id"]).isolation_uid is None
    again = api.post("/api/workspaces/", {"name": "b", "template": "shell-default"}, format="json")
    assert again.status_code == 201, again.content
    other = client_for(other_user).post(
        "/api/workspaces/", {"name": "c", "template": "shell-default"}, format="json"
    )
    assert other.status_code == 409, other.content
    assert "WORKSPACE_PROCESS_ISOLATION=none" in other.json()["detail"]
    assert not Workspace.objects.filter(owner=other_user).exists()
