"""The dashboard and the admin in a real browser: Debian's chromium, headless, driven by
selenium, against the live server, a real Celery worker and real agents.

Screenshots are kept as test artifacts in ``SCREENSHOT_DIR`` (default ``var/screenshots``).
Needs ``chromium`` and ``chromium-driver`` (apt); skips without them unless ``REQUIRE_BROWSER``
is set (CI sets it), then it fails.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.support import REPO, lifecycle_queue, wait_for
from workspaces import services
from workspaces.models import Workspace
from workspaces.status import EventSource, WorkspaceStatus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", REPO / "var" / "screenshots"))


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but chromium / chromium-driver are missing")
        pytest.skip("no chromium (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ws-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _password_for_the_stack(user: Any) -> Any:
    """The test settings hash passwords with MD5 (fast); the stack runs the production settings,
    which verify only their own hashers: store the password as production does."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode("x-password-123", hasher.salt())
    user.save(update_fields=["password"])
    return user


def _log_in(driver: Any, base: str, path: str, username: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + path)
    driver.find_element(By.NAME, "username").send_keys(username)
    driver.find_element(By.NAME, "password").send_keys("x-password-123")
    assert "login" in urlparse(driver.current_url).path, driver.current_url
    driver.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
    # click() returns before the next page has loaded: wait until the browser is on the page
    # the login redirects to and has loaded it, or the test would read the login page.
    WebDriverWait(driver, 30).until(
        lambda d: (
            "login" not in urlparse(d.current_url).path
            and d.execute_script("return document.readyState") == "complete"
        )
    )


def _text(driver: Any, selector: str) -> str:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return "\n".join(el.text for el in driver.find_elements(By.CSS_SELECTOR, selector))
    except WebDriverException:  # the page replaced the element while it was read: read again
        return ""


def _badge(driver: Any, workspace_id: Any) -> str:
    return _text(driver, f'[data-workspace="{workspace_id}"] [data-field="status"]')


def _same_origin_only(driver: Any, base: str) -> None:
    """No CDN: every resource the page loaded came from the platform itself."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls, "the page loaded no resources"
    assert all(url.startswith(base) for url in urls), urls


def _click(driver: Any, workspace_id: Any, verb: str) -> None:
    from selenium.webdriver.common.by import By

    selector = f'[data-workspace="{workspace_id}"] [data-verb={verb}]'
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, selector).is_enabled(), message=verb)
    driver.find_element(By.CSS_SELECTOR, selector).click()


def _open_link(driver: Any, workspace_id: Any) -> str:
    from selenium.webdriver.common.by import By

    selector = f'[data-workspace="{workspace_id}"] [data-role=open]'
    links = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, selector), message="the Open link"
    )
    return str(links[0].get_attribute("href"))


def test_a_person_from_login_to_jupyterlab_and_back(browser, on_stack, user) -> None:
    """The whole path a person takes, on the server bin/run starts: log in with a password,
    create a JupyterLab workspace on the dashboard, see it go online without reloading, open it
    through the proxy (the login carries over to the workspace's host) and see JupyterLab load;
    stop, start and delete it from the dashboard; log out, and its URL no longer lets them in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, base = browser, on_stack.url
    _password_for_the_stack(user)
    _log_in(driver, base, "/accounts/login/", "alice")
    assert urlparse(driver.current_url).path == "/"
    assert "No workspaces yet" in driver.page_source

    driver.find_element(By.NAME, "name").send_keys("notebook")
    Select(driver.find_element(By.NAME, "template")).select_by_value("jupyterlab")
    driver.find_element(By.CSS_SELECTOR, ".create [type=submit]").click()
    notebook = wait_for(
        lambda: Workspace.objects.filter(owner=user, name="notebook").first(), message="created"
    )
    # The form leads to the workspace's page; its badge turns online from the event stream,
    # with no reload (the mark set on the page now would be gone after one).
    wait_for(lambda: f"/w/{notebook.id}/" in driver.current_url, message="the workspace page")
    driver.execute_script("window.notReloaded = true")
    wait_for(
        lambda: _badge(driver, notebook.id) == "online",
        timeout=120,
        message=f"online (badge: {_badge(driver, notebook.id)!r})",
    )
    assert driver.execute_script("return window.notReloaded") is True
    driver.get(base + "/")
    assert _badge(driver, notebook.id) == "online"
    _same_origin_only(driver, base)
    driver.save_screenshot(str(SCREENSHOTS / "first-workspace.png"))

    # Open: the platform's login becomes the workspace host's cookie, and JupyterLab loads.
    url = _open_link(driver, notebook.id)
    assert urlparse(url).hostname == f"notebook--alice.{'localhost'}", url
    driver.get(url)
    wait_for(
        lambda: (
            urlparse(driver.current_url).hostname == "notebook--alice.localhost"
            and "/lab" in driver.current_url
            and driver.find_elements(By.CSS_SELECTOR, "#main, .jp-LabShell")
        ),
        timeout=90,
        message="JupyterLab's page on the workspace host",
    )
    assert "JupyterLab" in driver.title, driver.title
    driver.save_screenshot(str(SCREENSHOTS / "jupyterlab.png"))

    # Stop, start and delete from the dashboard; each badge follows live.
    driver.get(base + "/")
    _click(driver, notebook.id, "stop")
    wait_for(lambda: _badge(driver, notebook.id) == "stopped", timeout=60, message="stopped")
    _click(driver, notebook.id, "start")
    wait_for(lambda: _badge(driver, notebook.id) == "online", timeout=120, message="online")

    # Log out: the workspace's URL then lets nobody in; the browser is sent to log in.
    driver.find_element(By.CSS_SELECTOR, "form[action='/accounts/logout/'] [type=submit]").click()
    wait_for(lambda: "/accounts/login/" in driver.current_url, message="logged out")
    driver.get(url)
    wait_for(
        lambda: (
            urlparse(driver.current_url).hostname != "notebook--alice.localhost"
            and "/accounts/login/" in driver.current_url
        ),
        timeout=30,
        message="the workspace's URL sends a logged-out browser to log in",
    )
    assert not driver.find_elements(By.CSS_SELECTOR, ".jp-LabShell")

    _log_in(driver, base, "/accounts/login/", "alice")
    _click(driver, notebook.id, "remove")
    assert "cannot be undone" in driver.page_source
    driver.find_element(By.ID, "confirm-remove").click()
    wait_for(
        lambda: Workspace.objects.get(id=notebook.id).status == WorkspaceStatus.REMOVED,
        timeout=60,
        message="removed",
    )
    status, _, _ = on_stack.request(
        "GET",
        "/",
        headers={"Host": f"notebook--alice.localhost:{on_stack.proxy_port}"},
        base=on_stack.proxy_url,
    )
    assert status in (302, 404), status


def _hold_log_streams(stack: Any, token: str, workspace_id: Any, count: int) -> list[Any]:
    """``count`` log streams held open by an API client (each takes one of the user's places)."""
    held = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", stack.web_port, timeout=30)
        conn.request(
            "GET",
            f"/api/workspaces/{workspace_id}/logs/stream/?tail=0",
            headers={"Authorization": f"Token {token}", "Accept": "text/event-stream"},
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
        held.append(conn)
    return held


def test_dashboard_in_a_real_browser(browser, on_stack, user) -> None:
    """The dashboard's live parts on the server bin/run starts: env through the form, the badge
    and the events from the event stream, the output followed on the log stream (and polled
    when no stream place is left), a preflight failure in the list, buttons that follow the
    status, stop and delete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, driver, token = on_stack.url, browser, services.issue_api_token(user)
    _password_for_the_stack(user)
    _log_in(driver, base, "/", "alice")
    assert "No workspaces yet" in driver.page_source

    # Create through the form, with a template choice and env.
    driver.find_element(By.NAME, "name").send_keys("demo")
    Select(driver.find_element(By.NAME, "template")).select_by_value("shell-default")
    driver.find_element(By.NAME, "env").send_keys("GREETING=hello")
    driver.find_element(By.CSS_SELECTOR, ".create [type=submit]").click()
    demo = wait_for(lambda: Workspace.objects.filter(name="demo").first(), message="created")
    assert demo.env.reveal() == {"GREETING": "hello"}
    wait_for(lambda: f"/w/{demo.id}/" in driver.current_url, message="the workspace page")

    # The status turns online on the open page, from the event stream (no reload).
    wait_for(lambda: _badge(driver, demo.id) == "online", timeout=60, message="online, live")
    # The log tail shows the agent's own output.
    wait_for(
        lambda: f"registered workspace {demo.id}" in _text(driver, "#log"),
        timeout=30,
        message="the agent's output in the log tail",
    )
    wait_for(lambda: "ONLINE" in _text(driver, "#events"), message="the ONLINE event, live")
    assert "user:alice" in _text(driver, "#events")
    # The tail is followed on the log stream (no polling): a line the instance's output gets
    # now shows on the open page.
    log = driver.find_element(By.ID, "log")
    assert log.get_attribute("data-mode") == "stream"
    with open(on_stack.data_dir / str(demo.id) / "agent.log", "a") as handle:
        handle.write("a line written while the page is open\n")
    wait_for(
        lambda: "a line written while the page is open" in _text(driver, "#log"),
        message="a new line on the log stream",
    )
    assert log.get_attribute("data-mode") == "stream"
    _same_origin_only(driver, base)
    driver.save_screenshot(str(SCREENSHOTS / "workspace.png"))

    # A second workspace and a failing one (by the API), so the list shows more than one status.
    for name, template in (("notebook", "shell-default"), ("assistant", "claude-code-default")):
        status, _ = on_stack.api(
            "POST", "/api/workspaces/", token, {"name": name, "template": template}
        )
        assert status == 201
    failing = Workspace.objects.get(name="assistant")
    driver.get(base + "/")
    wait_for(lambda: _badge(driver, failing.id) == "failed", timeout=60, message="preflight")
    assert "ANTHROPIC_API_KEY" in _text(driver, f'[data-workspace="{failing.id}"]')
    notebook = Workspace.objects.get(name="notebook")
    wait_for(lambda: _badge(driver, notebook.id) == "online", timeout=60, message="notebook")
    # Buttons follow the status: an online workspace cannot be started again.
    start = driver.find_element(By.CSS_SELECTOR, f'[data-workspace="{demo.id}"] [data-verb=start]')
    assert not start.is_enabled()
    _same_origin_only(driver, base)
    driver.save_screenshot(str(SCREENSHOTS / "dashboard.png"))

    # No log stream to be had (every place taken): the page falls back to polling the tail.
    driver.get(base + "/")  # the workspace page's own stream ends with it
    held = _hold_log_streams(
        on_stack, token, notebook.id, int(on_stack.env["LOGS_STREAMS_PER_USER"])
    )
    try:
        driver.get(f"{base}/w/{notebook.id}/")
        wait_for(
            lambda: driver.find_element(By.ID, "log").get_attribute("data-mode") == "poll",
            message="the log tail falls back to polling",
        )
        wait_for(lambda: "registered workspace" in _text(driver, "#log"), message="polled tail")
        assert "polling" in _text(driver, "#log-state")
    finally:
        for conn in held:
            conn.close()
    driver.get(base + "/")

    # Stop from the list; the badge follows to stopped.
    _click(driver, demo.id, "stop")
    wait_for(lambda: _badge(driver, demo.id) == "stopped", timeout=60, message="stopped, live")

    # Delete asks first; confirming removes it.
    _click(driver, demo.id, "remove")
    assert "cannot be undone" in driver.page_source
    assert Workspace.objects.get(id=demo.id).status == WorkspaceStatus.STOPPED
    driver.find_element(By.ID, "confirm-remove").click()
    wait_for(
        lambda: Workspace.objects.get(id=demo.id).status == WorkspaceStatus.REMOVED,
        timeout=60,
        message="removed",
    )


def test_an_operator_filters_and_acts_in_the_admin(browser, on_stack, user, make_user) -> None:
    """An operator logs in at /admin/login/ with a password, filters the workspaces by status
    and stops one with the list's action: the stack's worker carries it out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    operator = make_user("operator", staff=True)
    operator.is_superuser = True
    operator.save()
    _password_for_the_stack(operator)
    token = services.issue_api_token(user)
    for name in ("first", "second"):
        status, _ = on_stack.api(
            "POST", "/api/workspaces/", token, {"name": name, "template": "shell-default"}
        )
        assert status == 201
    first, second = Workspace.objects.get(name="first"), Workspace.objects.get(name="second")
    online = WorkspaceStatus.ONLINE
    wait_for(
        lambda: Workspace.objects.filter(id__in=[first.id, second.id], status=online).count() == 2,
        timeout=60,
        message="both online",
    )
    driver = browser
    _log_in(driver, on_stack.url, "/admin/login/?next=/admin/workspaces/workspace/", "operator")
    wait_for(lambda: "Select workspace" in driver.title, message="the changelist")
    driver.find_element(
        By.CSS_SELECTOR, "#changelist-filter a[href*='status__exact=online']"
    ).click()
    wait_for(lambda: "status__exact=online" in driver.current_url, message="the filter")
    driver.find_element(By.CSS_SELECTOR, f"input.action-select[value='{first.id}']").click()
    Select(driver.find_element(By.NAME, "action")).select_by_value("stop_selected")
    driver.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    wait_for(
        lambda: Workspace.objects.get(id=first.id).status == WorkspaceStatus.STOPPED,
        timeout=60,
        message="stopped by the admin's action",
    )
    assert Workspace.objects.get(id=second.id).status == WorkspaceStatus.ONLINE
    driver.save_screenshot(str(SCREENSHOTS / "admin-action.png"))


def test_admin_is_readable_at_1400px(browser, on_stack, make_user, user) -> None:
    from selenium.webdriver.common.by import By

    operator = make_user("operator", staff=True)
    operator.is_superuser = True
    operator.save()
    _password_for_the_stack(operator)
    # Their cycles go to a queue no worker consumes: a session worker that began the failed
    # workspace's first cycle (generation 1) would fence out the failure written at generation 0.
    with lifecycle_queue("admin-browser-nobody"):
        team = services.create_team(owner=user, name="crew", template="team-default")
        failed = services.create_workspace(owner=user, name="assistant", template="shell-default")
    assert services.fail_cycle(
        failed.id,
        0,
        source=EventSource.BACKEND,
        message="the instance exited with code 1: FATAL: could not load model weights",
    )
    driver = browser
    _log_in(driver, on_stack.url, "/admin/login/?next=/admin/workspaces/workspace/", "operator")
    wait_for(lambda: "Select workspace" in driver.title, message="the changelist")
    # Readable at 1400 px: neither the page nor the results table scrolls sideways.
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 1400, width
    overflow = driver.execute_script(
        "const r = document.querySelector('#changelist .results');"
        "return r.scrollWidth - r.clientWidth"
    )
    assert overflow <= 0, f"the results table is {overflow}px wider than its box"
    assert "FATAL: could not load model weights" in driver.page_source
    driver.save_screenshot(str(SCREENSHOTS / "admin-list.png"))
    driver.get(f"{on_stack.url}/admin/workspaces/workspace/{team.parent.id}/change/")
    assert "team members" in driver.page_source.lower()
    assert not driver.find_elements(By.NAME, "_save")
    assert driver.find_elements(By.CSS_SELECTOR, "input[name=_restart]")
    driver.save_screenshot(str(SCREENSHOTS / "admin-detail.png"))
    driver.get(f"{on_stack.url}/admin/workspaces/workspaceevent/")
    assert "PROVISION_FAILED" in driver.page_source
    overflow = driver.execute_script(
        "const r = document.querySelector('#changelist .results');"
        "return r.scrollWidth - r.clientWidth"
    )
    assert overflow <= 0, f"the events table is {overflow}px wider than its box"
    driver.save_screenshot(str(SCREENSHOTS / "admin-events.png"))


def test_the_list_reads_its_badges_again_each_time_its_stream_opens(
    browser, on_stack, user
) -> None:
    """The list's stream resumes after the newest event id of all workspaces; an older id
    committed late is never replayed. Whatever a missed event said, the badges are read again
    when the stream (re)opens: here the status changes with no event at all, and the badge
    follows at the next reconnect."""
    from tests.provisioning.test_reconciler import make_row

    row = make_row(user, WorkspaceStatus.ONLINE, name="quiet")
    _password_for_the_stack(user)
    _log_in(browser, on_stack.url, "/", "alice")
    assert _badge(browser, row.id) == "online"
    events = row.events.count()
    Workspace.objects.filter(id=row.id).update(status=WorkspaceStatus.OFFLINE)
    # The stack's streams end after 20 s (EVENTS_STREAM_MAX_SECONDS) and the page reconnects.
    wait_for(lambda: _badge(browser, row.id) == "offline", timeout=30, message="read again")
    assert row.events.count() == events  # no event said so: the badge was read again
