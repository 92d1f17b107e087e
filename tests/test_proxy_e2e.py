"""Workspaces through the real proxy (Caddy), on the process backend and on Docker.

Every request goes to Caddy's listener (``PROXY_BIND``) with the workspace's host name, as a
browser would send it; Caddy asks the live test server (forward_auth) and forwards to the app.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings

from provisioning import proxy
from provisioning.reconciler import reconcile_once
from tests.apps.echo_app import IDENTITY_HEADER
from tests.conftest import client_for
from tests.support import REPO, Caddy, Worker, lifecycle_queue, wait_for
from workspaces.models import Workspace
from workspaces.status import WorkspaceStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
S = WorkspaceStatus
QUEUE = "lifecycle-proxy"
ECHO_TEMPLATE = "echo-app"
DEFAULT_PAGE = "Your workspace is running"


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proxy_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped templates plus an app that shows what it receives and echoes a WebSocket."""
    directory = tmp_path_factory.mktemp("proxy-templates")
    for template in (REPO / "workspace_templates").iterdir():
        shutil.copytree(template, directory / template.name)
    (directory / ECHO_TEMPLATE).mkdir()
    # The app travels as a template file: the platform copies it into the workspace's config
    # folder, which the workspace's own uid can read (the checkout may be closed to it), and
    # `{python}` is an interpreter that uid can run (WORKSPACE_APPS_PYTHON).
    shutil.copy(REPO / "tests" / "apps" / "echo_app.py", directory / ECHO_TEMPLATE / "echo_app.py")
    (directory / ECHO_TEMPLATE / "config.yaml").write_text(
        "runtime: shell\n"
        "env:\n  AGENT_HEARTBEAT_SECONDS: '1'\n"
        "app:\n  port: auto\n  health_path: /\n"
        '  command: exec {python} "$WORKSPACE_CONFIG_DIR/echo_app.py"\n'
    )
    yield directory


@pytest.fixture(scope="module")
def proxy_worker(
    worker_env: dict[str, str], proxy_templates: Path, caddy: Caddy
) -> Iterator[Worker]:
    """A process-backend worker that knows the extra template, alone on its own queue."""
    env = {
        **worker_env,
        "WORKSPACE_TEMPLATES_DIR": str(proxy_templates),
        "CELERY_LIFECYCLE_QUEUE": QUEUE,
    }
    worker = Worker(env, concurrency=2, name="proxy", queues=QUEUE).start()
    yield worker
    worker.stop()
    shutil.copy(worker.log_path, Path("/tmp") / f"proxy-worker-{os.getpid()}.log")


@pytest.fixture
def on_proxy_worker(
    proxy_worker: Worker, proxy_templates: Path, settings: Any, instances: None
) -> Iterator[Worker]:
    """This process (the API) knows the extra template and enqueues to ``proxy_worker``."""
    settings.WORKSPACE_TEMPLATES_DIR = proxy_templates
    with lifecycle_queue(QUEUE):
        yield proxy_worker


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest, caddy: Caddy, platform_url: str) -> str:
    request.getfixturevalue("on_docker" if request.param == "docker" else "on_proxy_worker")
    return str(request.param)


# --- helpers ---------------------------------------------------------------------------------
def token_of(user: Any) -> str:
    from workspaces import services

    return services.issue_api_token(user)


def via_proxy(
    url: str, path: str = "/", *, token: str | None = None, **headers: str
) -> requests.Response:
    """GET ``path`` on the workspace host through Caddy (the host name need not resolve)."""
    sent = {"Host": urlsplit(url).netloc, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if token:
        sent["Authorization"] = f"Token {token}"
    return requests.get(
        f"http://{settings.PROXY_BIND}{path}", headers=sent, allow_redirects=False, timeout=15
    )


def workspace(api: Any, workspace_id: str) -> dict:
    response = api.get(f"/api/workspaces/{workspace_id}/")
    assert response.status_code == 200, response.content
    return dict(response.json())


def wait_status(api: Any, workspace_id: str, status: S, timeout: float = 60) -> dict:
    def check() -> dict | None:
        body = workspace(api, workspace_id)
        assert body["status"] != S.FAILED or status == S.FAILED, body
        return body if body["status"] == status else None

    return wait_for(check, timeout=timeout, message=f"workspace {status}")


def create_online(api: Any, name: str, template: str = "shell-default") -> dict:
    response = api.post("/api/workspaces/", {"name": name, "template": template}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["url"] is None  # no url before the app answers
    return wait_status(api, response.json()["id"], S.ONLINE)


def served(url: str, token: str, text: str) -> requests.Response:
    """The app answers through the proxy as soon as the workspace has a url: nothing is written
    to the proxy per workspace, its check reads the row."""
    response = via_proxy(url, token=token)
    assert response.status_code == 200, response.text
    assert text in response.text
    return response


def answered_by(response: requests.Response) -> str:
    """Which workspace's echo app gave ``response`` (it says so in every answer)."""
    return str(response.headers.get(IDENTITY_HEADER, ""))


def proxy_config() -> Any:
    return proxy._call("GET", "/config/")


# --- tests -----------------------------------------------------------------------------------
def test_only_the_owner_and_staff_get_in_and_routes_follow_the_lifecycle(
    backend: str, caddy: Caddy, user: Any, other_user: Any, make_user: Any
) -> None:
    api = client_for(user)
    before = proxy_config()
    online = create_online(api, f"proxied-{backend}")
    url = online["url"]
    assert url == (
        f"http://proxied-{backend}--alice.{settings.WORKSPACE_DOMAIN}:"
        f"{settings.PROXY_BIND.rsplit(':', 1)[1]}/"
    )
    served(url, token_of(user), DEFAULT_PAGE)
    assert proxy_config() == before  # a workspace coming up writes nothing to the proxy

    # Another user: 403. Staff: in. An API client without credentials: 401.
    assert via_proxy(url, token=token_of(other_user)).status_code == 403
    staff = make_user("root", staff=True)
    assert via_proxy(url, token=token_of(staff)).status_code == 200
    anonymous = via_proxy(url, path="/some/page?x=1")
    assert anonymous.status_code == 401
    assert DEFAULT_PAGE not in anonymous.text
    assert via_proxy(url, token="not-a-token").status_code == 401
    # An anonymous browser goes to the platform, which asks it to log in.
    browser = via_proxy(url, path="/some/page?x=1", Accept="text/html")
    assert browser.status_code == 302
    location = browser.headers["Location"]
    assert location.startswith(f"{settings.PLATFORM_PUBLIC_URL}/workspaces/{online['id']}/open?")
    assert "next=%2Fsome%2Fpage%3Fx%3D1" in location

    # A proxy restarted empty: one reconcile pass loads its configuration back, and the
    # workspace is served again.
    caddy.restart(empty=True)
    with pytest.raises(requests.ConnectionError):
        via_proxy(url, token=token_of(user))
    report = reconcile_once()
    assert report.proxy.restored and not report.proxy.error
    assert proxy_config() == before
    assert via_proxy(url, token=token_of(user)).status_code == 200
    assert not reconcile_once().proxy.restored  # nothing to do the next time

    # Stop: the proxy stops serving it (404, as for any host it serves nothing at) and the url
    # goes.
    assert api.post(f"/api/workspaces/{online['id']}/stop/").status_code == 202
    stopped = wait_status(api, online["id"], S.STOPPED)
    assert stopped["url"] is None
    gone = via_proxy(url, token=token_of(user))
    assert gone.status_code == 404
    assert "no workspace" in gone.text

    # Start again: served again at once; delete ends it for good.
    assert api.post(f"/api/workspaces/{online['id']}/start/").status_code == 202
    wait_status(api, online["id"], S.ONLINE)
    served(url, token_of(user), DEFAULT_PAGE)
    assert api.delete(f"/api/workspaces/{online['id']}/").status_code == 202
    wait_status(api, online["id"], S.REMOVED)
    assert via_proxy(url, token=token_of(user)).status_code == 404
    assert proxy_config() == before


def test_a_client_cannot_choose_where_the_proxy_sends_its_request(
    on_proxy_worker: Worker, caddy: Caddy, platform_url: str, user: Any, other_user: Any
) -> None:
    """The upstream comes from the platform's answer alone: an ``X-Workspace-Upstream`` the
    client sends is dropped before the check, so nobody reaches another workspace's app (or
    anything else on the proxy's network) by naming it."""
    api = client_for(user)
    mine = create_online(api, "mine", template=ECHO_TEMPLATE)
    theirs = create_online(client_for(other_user), "theirs", template=ECHO_TEMPLATE)
    their_upstream = f"127.0.0.1:{Workspace.objects.get(id=theirs['id']).app_port}"
    token = token_of(user)

    seen = via_proxy(
        mine["url"], "/headers", token=token, **{"X-Workspace-Upstream": their_upstream}
    )
    assert seen.status_code == 200, seen.text
    assert answered_by(seen) == mine["id"] != theirs["id"]  # my own app answered
    assert seen.json()["Host"] == urlsplit(mine["url"]).netloc
    assert "x-workspace-upstream" not in {name.lower() for name in seen.json()}
    # Refused at its own host, the header gets the client nowhere either.
    refused = via_proxy(
        theirs["url"], "/headers", token=token, **{"X-Workspace-Upstream": their_upstream}
    )
    assert refused.status_code == 403
    anonymous = via_proxy(
        "http://nobody--here.localhost/", **{"X-Workspace-Upstream": their_upstream}
    )
    assert anonymous.status_code == 404


def test_reconcile_replaces_a_configuration_that_differs(caddy: Caddy) -> None:
    """A proxy holding another configuration (an older platform's per-workspace routes, a
    changed setting) gets the platform's back in one pass; a proxy that already serves it is
    only read."""
    wanted = proxy.base_config()
    routes = f"/config/apps/http/servers/{proxy.SERVER}/routes/0"
    leftover = {"match": [{"host": ["old.localhost"]}], "handle": [{"handler": "static_response"}]}
    proxy._call("PUT", routes, leftover)
    assert proxy_config() != wanted
    assert proxy.ensure_config() is True
    assert proxy_config() == wanted
    assert proxy.ensure_config() is False


def _ws_handshake(url: str, token: str) -> socket.socket:
    sock = socket.create_connection(
        (settings.PROXY_BIND.rsplit(":", 1)[0], int(settings.PROXY_BIND.rsplit(":", 1)[1])),
        timeout=15,
    )
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Token {token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _ws_echo(sock: socket.socket, text: str) -> str:
    payload, mask = text.encode(), os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    first, second = sock.recv(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", sock.recv(2))
    data = b""
    while len(data) < length:
        data += sock.recv(length - len(data))
    assert first & 0x0F == 0x1
    return data.decode()


def test_the_app_never_sees_platform_credentials_and_websockets_pass(
    on_proxy_worker: Worker, caddy: Caddy, platform_url: str, user: Any
) -> None:
    api = client_for(user)
    online = create_online(api, "echo", template=ECHO_TEMPLATE)
    url, token = online["url"], token_of(user)
    assert answered_by(served(url, token, "echo app")) == online["id"]

    cookie = (
        f"app_pref=dark; {settings.SESSION_COOKIE_NAME}=s3cret; "
        f"{settings.CSRF_COOKIE_NAME}=c5rf; theme=light"
    )
    seen = via_proxy(url, "/headers", token=token, Cookie=cookie)
    assert seen.status_code == 200, seen.text
    assert answered_by(seen) == online["id"]
    headers = {name.lower(): value for name, value in seen.json().items()}
    assert "authorization" not in headers
    assert "app_pref=dark" in headers["cookie"] and "theme=light" in headers["cookie"]
    assert "s3cret" not in headers["cookie"] and "c5rf" not in headers["cookie"]

    sock = _ws_handshake(url, token)
    try:
        assert _ws_echo(sock, "hello") == f"echo from {online['id']}: hello"
        assert _ws_echo(sock, "again") == f"echo from {online['id']}: again"
    finally:
        sock.close()

    # Without credentials the upgrade never reaches the app.
    raw = via_proxy(url, "/ws", Upgrade="websocket", Connection="Upgrade")
    assert raw.status_code == 401


def test_an_app_that_stops_answering_degrades_the_workspace_and_back(
    on_proxy_worker: Worker, caddy: Caddy, platform_url: str, user: Any
) -> None:
    api = client_for(user)
    online = create_online(api, "flaky", template=ECHO_TEMPLATE)
    assert answered_by(served(online["url"], token_of(user), "echo app")) == online["id"]
    row = Workspace.objects.get(id=online["id"])
    app_pid = _app_pid(row.backend_state["pid"])
    os.kill(app_pid, 19)  # SIGSTOP: the app stops answering, its port stays taken
    try:
        wait_status(api, online["id"], S.DEGRADED, timeout=60)
        # Degraded keeps its route: the owner still reaches whatever the app answers.
        assert workspace(api, online["id"])["url"] == online["url"]
    finally:
        os.kill(app_pid, 18)  # SIGCONT
    wait_status(api, online["id"], S.ONLINE, timeout=60)


def _app_pid(agent_pid: int) -> int:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    assert children, "the agent runs its app as a child"
    pid = int(children[0])
    # `sh -c "exec python app.py"`: the child is the app itself.
    assert "echo_app.py" in Path(f"/proc/{pid}/cmdline").read_text()
    return pid


# --- a real browser --------------------------------------------------------------------------
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "var" / "test-artifacts"))
# backend -> (template, a CSS selector of what the rendered app shows, its text)
BROWSER_APPS = {
    # JupyterLab's launcher renders once its front end has talked to the server's API.
    "process": ("jupyterlab", ".jp-Launcher", "Notebook"),
    "docker": ("shell-default", "h1", DEFAULT_PAGE),
}


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """Debian's headless Chromium through Debian's chromium-driver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.slow
@pytest.mark.browser
def test_a_browser_logs_in_and_opens_the_workspace_app(
    backend: str, caddy: Caddy, user: Any, chromium: Any
) -> None:
    from selenium.webdriver.common.by import By

    template, selector, expected = BROWSER_APPS[backend]
    api = client_for(user)
    response = api.post(
        "/api/workspaces/", {"name": f"browse-{backend}", "template": template}, format="json"
    )
    assert response.status_code == 201, response.content
    online = wait_status(api, response.json()["id"], S.ONLINE, timeout=180)

    # Anonymous: the workspace host sends the browser to the platform's login page.
    chromium.get(online["url"])
    wait_for(lambda: "/accounts/login/" in chromium.current_url, timeout=30, message="login page")
    chromium.find_element(By.NAME, "username").send_keys(user.username)
    password = chromium.find_element(By.NAME, "password")
    password.send_keys("x-password-123")
    password.submit()

    # Login -> open (ticket) -> the workspace host sets its cookie -> the app.
    host = urlsplit(online["url"]).netloc

    def rendered() -> bool:
        if urlsplit(chromium.current_url).netloc != host:
            return False
        return any(
            expected in element.text
            for element in chromium.find_elements(By.CSS_SELECTOR, selector)
        )

    wait_for(rendered, timeout=120, interval=0.5, message=f"{selector} in the browser at {host}")
    cookies = {cookie["name"] for cookie in chromium.get_cookies()}
    assert settings.WORKSPACE_COOKIE_NAME in cookies
    assert settings.SESSION_COOKIE_NAME not in cookies  # the platform's session stays on its host
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"workspace-{backend}-{template}.png"
    assert chromium.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
