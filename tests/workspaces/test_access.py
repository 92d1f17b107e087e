"""The platform's side of proxy access: the forward_auth answer, tickets, the workspace cookie,
and app ports (tests/test_proxy_e2e.py runs the same through a real Caddy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import IntegrityError, transaction
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from tests.conftest import client_for
from workspaces import access, services
from workspaces.manifests import InvalidManifest, parse_manifest
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

pytestmark = pytest.mark.django_db


def _workspace(owner: Any, name: str = "app", status: str = WorkspaceStatus.ONLINE) -> Workspace:
    """A workspace whose app is up (as its agent's registration leaves it), unless ``status``."""
    workspace = services.create_workspace(owner=owner, name=name, template="shell-default")
    running = status in (WorkspaceStatus.ONLINE, WorkspaceStatus.DEGRADED, WorkspaceStatus.OFFLINE)
    Workspace.objects.filter(id=workspace.id).update(
        status=status, is_running=running, last_started_at=timezone.now() if running else None
    )
    workspace.refresh_from_db()
    return workspace


def _host(workspace: Workspace) -> str:
    """What the proxy sends: the host the client asked for, port included."""
    return f"{access.workspace_host(workspace)}:8080"


def _auth(client: Any, workspace: Workspace, **headers: str) -> Any:
    return client.get("/api/proxy/auth", HTTP_X_WORKSPACE_HOST=_host(workspace), **headers)


def test_forward_auth_owner_staff_other_anonymous(user, other_user, make_user) -> None:
    workspace = _workspace(user)
    assert workspace.subdomain == "app--alice"
    allowed = _auth(client_for(user), workspace)
    assert allowed.status_code == 204
    # Where the proxy sends the request: the app's address, from the workspace's row.
    assert allowed.headers["X-Workspace-Upstream"] == f"127.0.0.1:{workspace.app_port}"
    assert _auth(client_for(make_user("root", staff=True)), workspace).status_code == 204
    other = _auth(client_for(other_user), workspace)
    assert other.status_code == 403
    assert other.json()["detail"]
    anonymous = _auth(APIClient(), workspace)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == "Token"
    browser = _auth(
        APIClient(), workspace, HTTP_ACCEPT="text/html,*/*", HTTP_X_FORWARDED_URI="/lab?x=1"
    )
    assert browser.status_code == 302
    assert browser.headers["Location"] == (
        f"{settings.PLATFORM_PUBLIC_URL}/workspaces/{workspace.id}/open?next=%2Flab%3Fx%3D1"
    )


def test_a_request_let_through_is_activity_and_a_refused_one_is_not(
    user, other_user, settings: Any
) -> None:
    """Requests through the workspace's route keep it from the idle auto-stop (rate-limited:
    one write per ACTIVITY_WRITE_INTERVAL_SECONDS)."""
    from datetime import timedelta

    from django.utils import timezone

    from workspaces.redis_client import get_redis
    from workspaces.services.activity import _activity_key

    workspace = _workspace(user)
    long_ago = timezone.now() - timedelta(hours=2)
    Workspace.objects.filter(id=workspace.id).update(last_activity_at=long_ago)
    get_redis().delete(_activity_key(workspace.id))
    assert _auth(client_for(other_user), workspace).status_code == 403
    assert Workspace.objects.get(id=workspace.id).last_activity_at == long_ago
    assert _auth(client_for(user), workspace).status_code == 204
    assert Workspace.objects.get(id=workspace.id).last_activity_at > long_ago


def test_forward_auth_without_a_known_workspace_is_404(user) -> None:
    api = client_for(user)
    workspace = _workspace(user)
    assert api.get("/api/proxy/auth").status_code == 404
    for host in (
        "nope--alice.localhost",  # no such workspace
        f"{workspace.subdomain}.elsewhere.example",  # not under WORKSPACE_DOMAIN
        f"x.{workspace.subdomain}.localhost",  # two labels below it
        "localhost",
    ):
        answer = api.get("/api/proxy/auth", HTTP_X_WORKSPACE_HOST=host)
        assert answer.status_code == 404, host
        assert "X-Workspace-Upstream" not in answer.headers
    # The host is matched without regard to case, as DNS names are.
    upper = api.get("/api/proxy/auth", HTTP_X_WORKSPACE_HOST=_host(workspace).upper())
    assert upper.status_code == 204


@pytest.mark.parametrize(
    "status",
    [WorkspaceStatus.PROVISIONING, WorkspaceStatus.STOPPING, WorkspaceStatus.STOPPED,
     WorkspaceStatus.FAILED, WorkspaceStatus.REMOVING, WorkspaceStatus.REMOVED],
)  # fmt: skip
def test_the_proxy_serves_a_workspace_only_while_its_app_is_up(user, status: str) -> None:
    """What the proxy serves follows the row: the moment a cycle moves it out of the routable
    statuses, requests are refused, for its owner too, as the proxy's own 404."""
    workspace = _workspace(user, status=status)
    answer = _auth(client_for(user), workspace)
    assert answer.status_code == 404
    assert answer.json() == {"detail": "no workspace is served at this address"}
    assert "X-Workspace-Upstream" not in answer.headers


def test_the_upstream_follows_the_row(user) -> None:
    """A Docker workspace on its own network is reached at the address its cycle recorded; the
    next cycle's address is used from the moment the row says so."""
    workspace = _workspace(user)
    Workspace.objects.filter(id=workspace.id).update(
        backend="docker", backend_state={"address": "172.30.0.2"}
    )
    answer = _auth(client_for(user), workspace)
    assert answer.headers["X-Workspace-Upstream"] == f"172.30.0.2:{workspace.app_port}"
    Workspace.objects.filter(id=workspace.id).update(backend_state={"address": "172.30.0.18"})
    answer = _auth(client_for(user), workspace)
    assert answer.headers["X-Workspace-Upstream"] == f"172.30.0.18:{workspace.app_port}"


def test_an_isolated_process_workspace_is_reached_at_its_link(user) -> None:
    """A process workspace in a network namespace of its own is reached at its end of the link,
    which its cycle recorded; one with no address recorded (unisolated) on loopback."""
    workspace = _workspace(user)
    assert workspace.backend == "process"
    Workspace.objects.filter(id=workspace.id).update(backend_state={"address": "10.213.0.5"})
    answer = _auth(client_for(user), workspace)
    assert answer.headers["X-Workspace-Upstream"] == f"10.213.0.5:{workspace.app_port}"
    Workspace.objects.filter(id=workspace.id).update(backend_state={})
    answer = _auth(client_for(user), workspace)
    assert answer.headers["X-Workspace-Upstream"] == f"127.0.0.1:{workspace.app_port}"


def test_a_renamed_workspace_moves_to_its_new_host(user) -> None:
    workspace = _workspace(user)
    old_host = _host(workspace)
    services.update_workspace(workspace.id, name="renamed", fields=frozenset({"name"}))
    workspace.refresh_from_db()
    assert workspace.subdomain == "renamed--alice"
    api = client_for(user)
    assert api.get("/api/proxy/auth", HTTP_X_WORKSPACE_HOST=old_host).status_code == 404
    assert _auth(api, workspace).status_code == 204


def test_owners_whose_names_map_alike_share_a_host_and_the_first_is_served(make_user) -> None:
    """``a.b`` and ``a-b`` both become the label ``a-b``: the workspace created first is served
    at the host, and the platform checks each request against it, so the second owner gets a 403
    there, never the first owner's app."""
    first, second = make_user("a.b"), make_user("a-b")
    mine, theirs = _workspace(first, "dev"), _workspace(second, "dev")
    assert mine.subdomain == theirs.subdomain == "dev--a-b"
    assert _auth(client_for(first), mine).status_code == 204
    assert _auth(client_for(second), theirs).status_code == 403


def test_the_cookie_opens_only_its_own_workspace_for_its_user(user) -> None:
    mine, second = _workspace(user, "one"), _workspace(user, "two")
    client = APIClient()
    client.cookies[settings.WORKSPACE_COOKIE_NAME] = access.cookie_value(user, mine)
    assert _auth(client, mine).status_code == 204
    assert _auth(client, second).status_code == 401  # another host, another cookie
    user.set_password("a-new-password-456")
    user.save()
    assert _auth(client, mine).status_code == 401  # a password change ends it


def test_a_logout_ends_the_workspace_cookies_issued_before_it(user) -> None:
    """The workspace cookie lives on the workspace's host, where the platform's logout cannot
    delete it: the logout makes the platform refuse it. A cookie issued after it is good."""
    workspace = _workspace(user)
    before = APIClient()
    before.cookies[settings.WORKSPACE_COOKIE_NAME] = access.cookie_value(user, workspace)
    assert _auth(before, workspace).status_code == 204
    platform = Client()
    platform.force_login(user)
    assert platform.post("/accounts/logout/").status_code == 302
    assert _auth(before, workspace).status_code == 401
    after = APIClient()
    after.cookies[settings.WORKSPACE_COOKIE_NAME] = access.cookie_value(user, workspace)
    assert _auth(after, workspace).status_code == 204


def test_a_ticket_is_accepted_once_and_only_for_its_workspace(user, other_user) -> None:
    mine, theirs = _workspace(user, "one"), _workspace(other_user, "two")
    ticket = access.issue_ticket(user, mine)
    assert access.redeem_ticket(ticket, theirs) is None
    assert access.redeem_ticket(ticket, mine) == user
    assert access.redeem_ticket(ticket, mine) is None
    assert access.redeem_ticket("forged", mine) is None


def test_the_handshake_sets_a_host_only_cookie(user) -> None:
    workspace = _workspace(user)
    ticket = access.issue_ticket(user, workspace)
    response = Client().get(
        "/_platform/session",
        {"ticket": ticket, "next": "//evil.example/"},
        HTTP_X_WORKSPACE_HOST=_host(workspace),
    )
    assert response.status_code == 302
    assert response.headers["Location"] == "/"  # never another host
    cookie = response.cookies[settings.WORKSPACE_COOKIE_NAME]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and not cookie["domain"]


def test_open_needs_a_login_and_hides_other_owners_workspaces(user, other_user) -> None:
    workspace = _workspace(user, status=WorkspaceStatus.PROVISIONING)
    anonymous = Client().get(f"/workspaces/{workspace.id}/open")
    assert anonymous.status_code == 302
    assert anonymous.headers["Location"].startswith(settings.LOGIN_URL)
    other = Client()
    other.force_login(other_user)
    assert other.get(f"/workspaces/{workspace.id}/open").status_code == 404
    owner = Client()
    owner.force_login(user)
    # Provisioning: no url yet, so nothing to open.
    assert owner.get(f"/workspaces/{workspace.id}/open").status_code == 409
    online = _workspace(user, "up")
    opened = owner.get(f"/workspaces/{online.id}/open")
    assert opened.status_code == 302
    assert opened.headers["Location"].startswith(f"http://{access.workspace_host(online)}:")


def test_app_ports_are_allocated_unique_and_freed_on_removal(user) -> None:
    low, high = settings.WORKSPACE_APP_PORT_RANGE
    ports = [_workspace(user, f"w{n}", WorkspaceStatus.PROVISIONING).app_port for n in range(5)]
    assert all(port is not None and low <= port <= high for port in ports)
    assert len(set(ports)) == 5
    first, second = (Workspace.objects.get(app_port=port) for port in ports[:2])
    with pytest.raises(IntegrityError), transaction.atomic():
        Workspace.objects.filter(id=second.id).update(app_port=ports[0])
    Workspace.objects.filter(id=first.id).update(status=WorkspaceStatus.REMOVED)
    # A removed workspace's port may be taken again.
    assert Workspace.objects.filter(id=second.id).update(app_port=ports[0]) == 1


def test_a_nearly_full_port_range_still_hands_out_every_port_then_refuses(
    user, settings: Any
) -> None:
    """Ports are drawn from a few random candidates; when all of those are taken (a range nearly
    full), every port in use is read and a free one is still found, until there is none."""
    settings.WORKSPACE_APP_PORT_RANGE = (31000, 31003)
    ports = {_workspace(user, f"p{n}", WorkspaceStatus.PROVISIONING).app_port for n in range(4)}
    assert ports == {31000, 31001, 31002, 31003}
    with pytest.raises(services.InvalidInput) as refused:
        _workspace(user, "p4", WorkspaceStatus.PROVISIONING)
    assert refused.value.field == "template"
    assert "no free app port" in refused.value.message


def test_a_fixed_app_port_serves_one_live_workspace(user, tmp_path: Path, settings: Any) -> None:
    folder = tmp_path / "fixed"
    folder.mkdir()
    (folder / "config.yaml").write_text("runtime: shell\napp:\n  port: 28080\n")
    settings.WORKSPACE_TEMPLATES_DIR = tmp_path
    assert services.create_workspace(owner=user, name="a", template="fixed").app_port == 28080
    with pytest.raises(services.InvalidInput) as refused:
        services.create_workspace(owner=user, name="b", template="fixed")
    assert refused.value.field == "template"
    assert "28080" in refused.value.message


@pytest.mark.parametrize(
    ("app", "field"),
    [
        ("app: 8080", "app"),
        ("app:\n  port: 0", "app.port"),
        ("app:\n  port: web", "app.port"),
        ("app:\n  health_path: health", "app.health_path"),
        ("app:\n  command: ['a']", "app.command"),
        ("app:\n  bogus: 1", "app.bogus"),
    ],
)
def test_a_bad_app_block_names_its_field(tmp_path: Path, app: str, field: str) -> None:
    manifest = tmp_path / "config.yaml"
    manifest.write_text(f"runtime: shell\n{app}\n")
    with pytest.raises(InvalidManifest) as error:
        parse_manifest("bad", manifest)
    assert error.value.error.field == field
