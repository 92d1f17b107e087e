"""One timeout accessor: the API's ``provision_timeout_ms``, ``GET /api/templates/`` and the
sweeper resolve every template to the same number, under every kind of override."""

from __future__ import annotations

import ast
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from provisioning import sweeper
from workspaces.manifests import invalidate_templates, templates
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.status import EventSource, WorkspaceStatus
from workspaces.timeouts import provision_timeout_seconds

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]
SECOND = timedelta(seconds=1)


def _override(scenario: str, settings: Any, templates_dir: Path) -> None:
    if scenario == "global override":
        settings.PROVISION_TIMEOUT_SECONDS = 123
    elif scenario == "runtime defaults":
        settings.RUNTIME_PROVISION_TIMEOUTS = {"hermes": 2400, "shell": 700, "claude-code": 1000}
    elif scenario == "manifests edited":
        (templates_dir / "slowboot" / "config.yaml").write_text(
            "runtime: shell\nruntime_config:\n  provision_timeout_seconds: 1500\n"
        )
        (templates_dir / "hermes-default" / "config.yaml").write_text(
            "runtime: hermes\nruntime_config:\n  provision_timeout_seconds: 2000\n"
        )
        invalidate_templates()
    elif scenario == "template deleted":
        # Rows outlive their template: the runtime default applies, the same everywhere.
        (templates_dir / "hermes-default" / "config.yaml").unlink()
        invalidate_templates()


def _sweeper_timeout(make_row: Any, template: str, runtime: str, seconds: int) -> int:
    """What the sweeper resolves, observed from what it does: it spares a row one second before
    ``seconds`` and flips one a second after, recording ``timeout_secs``."""
    now = timezone.now()
    before = make_row(template, runtime=runtime, age=timedelta(seconds=seconds) - SECOND, now=now)
    after = make_row(template, runtime=runtime, age=timedelta(seconds=seconds) + SECOND, now=now)
    report = sweeper.sweep(now=now, use_lock=False)
    flipped = {item.workspace_id: item.timeout_secs for item in report.flipped}
    assert before.id not in flipped, f"{template}: the sweeper's deadline is earlier"
    assert after.id in flipped, f"{template}: the sweeper's deadline is later"
    event = WorkspaceEvent.objects.get(
        workspace_id=after.id, source=EventSource.PROVISION_TIMEOUT_SWEEP
    )
    assert event.payload["timeout_secs"] == flipped[after.id]
    Workspace.objects.filter(id__in=[before.id, after.id]).update(status=WorkspaceStatus.STOPPED)
    return flipped[after.id]


@pytest.mark.parametrize(
    "scenario",
    ["defaults", "global override", "runtime defaults", "manifests edited", "template deleted"],
)
def test_api_templates_endpoint_and_sweeper_resolve_the_same(
    scenario, api, make_row, settings, templates_dir
) -> None:
    _override(scenario, settings, templates_dir)
    listed = {item["name"]: item for item in api.get("/api/templates/").json()}
    # Team templates too: a team's parent is a workspace of the team template.
    cases = [(t.name, t.runtime) for t in templates().templates.values()]
    assert {name for name, _ in cases} == set(listed)
    if scenario == "template deleted":
        cases.append(("hermes-default", "hermes"))
    assert len(cases) >= 6
    for name, runtime in cases:
        row = make_row(name, runtime=runtime, age=timedelta(0))
        body = api.get(f"/api/workspaces/{row.id}/").json()
        api_seconds = body["provision_timeout_ms"] / 1000
        Workspace.objects.filter(id=row.id).update(status=WorkspaceStatus.STOPPED)
        seen = {"api": api_seconds, "accessor": provision_timeout_seconds(name, runtime)}
        if name in listed:
            seen["templates"] = listed[name]["provision_timeout_seconds"]
        seen["sweeper"] = _sweeper_timeout(make_row, name, runtime, int(api_seconds))
        assert len(set(seen.values())) == 1, f"{scenario}: {name} resolves differently: {seen}"
        if scenario == "global override":
            assert api_seconds == 123


def test_expected_values_under_defaults(templates_dir) -> None:
    assert provision_timeout_seconds("hermes-default", "hermes") == 1800  # runtime default
    assert provision_timeout_seconds("slowboot", "shell") == 1200  # manifest
    assert provision_timeout_seconds("claude-code-default", "claude-code") == 900
    assert provision_timeout_seconds("shell-default", "shell") == 600  # the last resort
    assert provision_timeout_seconds("gone", "hermes") == 1800


TIMEOUT_NAMES = {
    "PROVISION_TIMEOUT_SECONDS",
    "RUNTIME_PROVISION_TIMEOUTS",
    "DEFAULT_PROVISION_TIMEOUT_SECONDS",
    "provision_timeout_seconds",
}


def timeout_reads(source: str) -> list[str]:
    """Where ``source`` reads a timeout setting or the manifest's timeout itself: an attribute
    (``settings.PROVISION_TIMEOUT_SECONDS``, ``template.provision_timeout_seconds``) or the name
    as a string, which covers ``getattr(settings, "…")``, ``os.environ["…"]``,
    ``os.environ.get("…")``, ``os.getenv("…")`` and ``manifest["runtime_config"]["…"]``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in TIMEOUT_NAMES:
            found.append(f"{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in TIMEOUT_NAMES:
            found.append(f"{node.lineno} {node.value!r}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "settings.PROVISION_TIMEOUT_SECONDS",
        "template.provision_timeout_seconds",
        'getattr(settings, "RUNTIME_PROVISION_TIMEOUTS")',
        'getattr(settings, "DEFAULT_PROVISION_TIMEOUT_SECONDS", 600)',
        'os.environ["PROVISION_TIMEOUT_SECONDS"]',
        'os.environ.get("PROVISION_TIMEOUT_SECONDS", "600")',
        'os.getenv("PROVISION_TIMEOUT_SECONDS")',
        'manifest["runtime_config"]["provision_timeout_seconds"]',
        'raw.get("runtime_config", {}).get("provision_timeout_seconds")',
    ],
)
def test_the_accessor_guard_catches_every_way_of_reading_a_timeout(snippet: str) -> None:
    assert timeout_reads(f"x = {snippet}\n"), snippet


def test_the_accessor_guard_passes_the_accessor_call() -> None:
    source = "from workspaces.timeouts import provision_timeout_seconds as t\nt('a', 'b')\n"
    assert timeout_reads("x = settings.GATE_LEASE_SECONDS\n") == []
    assert timeout_reads(source) == []


def test_nothing_but_the_accessor_reads_the_timeout_settings() -> None:
    """Every caller goes through workspaces.timeouts; nothing re-implements the order."""
    allowed = {
        ROOT / "workspaces" / "timeouts.py",
        # The settings declare them (project/settings/workspaces.py).
        *(ROOT / "project" / "settings").glob("*.py"),
        # The manifest parser reads the manifest's own field; the accessor is its only reader.
        ROOT / "workspaces" / "manifests.py",
    }
    offenders = []
    scanned = 0
    for package in ("workspaces", "provisioning", "portal", "project"):
        for path in (ROOT / package).rglob("*.py"):
            if path in allowed or "migrations" in path.parts:
                continue
            scanned += 1
            for where in timeout_reads(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{where}")
    assert scanned > 20
    assert not offenders, "timeouts resolved outside workspaces.timeouts: " + ", ".join(offenders)

    for module in ("provisioning/sweeper.py", "portal/api/serializers.py"):
        tree = ast.parse((ROOT / module).read_text())
        imports = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module == "workspaces.timeouts"
            and any(alias.name == "provision_timeout_seconds" for alias in node.names)
        ]
        assert imports, f"{module} does not use workspaces.timeouts.provision_timeout_seconds"
