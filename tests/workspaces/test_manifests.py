"""Template manifests: validation names the path and field; ``manage.py check`` reports it;
the registry is cached and reloaded when a file changes; a broken manifest never crashes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from tests.support import REPO, service_env, write_templates
from workspaces import manifests
from workspaces.manifests import invalidate_templates, load_templates, templates

BAD_MANIFESTS = {
    "bad-timeout": (
        "runtime: shell\nruntime_config:\n  provision_timeout_seconds: twenty\n",
        "runtime_config.provision_timeout_seconds",
    ),
    "bad-negative": (
        "runtime: shell\nruntime_config:\n  provision_timeout_seconds: -5\n",
        "runtime_config.provision_timeout_seconds",
    ),
    "bad-required": (
        "runtime: shell\nruntime_config:\n  required_env: [OK_NAME, 'not a name']\n",
        "runtime_config.required_env",
    ),
    "bad-runtime": ("image: x\n", "runtime"),
    "bad-key": ("runtime: shell\nimagee: typo\n", "imagee"),
    "bad-yaml": ("runtime: [unclosed\n", "(yaml)"),
    "bad-env": ("runtime: shell\nenv:\n  WORKSPACE_TOKEN: x\n", "env.WORKSPACE_TOKEN"),
    "bad-sandbox": ("runtime: shell\nsandbox: kata\n", "sandbox"),
    "bad-placement": ("runtime: shell\nplacement: [node.role==worker]\n", "placement"),
    "bad-constraint": (
        "runtime: shell\nplacement:\n  constraints: ['node.role worker']\n",
        "placement.constraints",
    ),
}


def _bad_dir(tmp_path: Path) -> Path:
    return write_templates(
        tmp_path / "templates", {name: text for name, (text, _) in BAD_MANIFESTS.items()}
    )


def test_each_malformed_manifest_is_reported_with_its_path_and_field(tmp_path) -> None:
    directory = _bad_dir(tmp_path)
    loaded = load_templates(directory)
    reported = {(error.path, error.field) for error in loaded.errors}
    for name, (_, field) in BAD_MANIFESTS.items():
        assert (str(directory / name / "config.yaml"), field) in reported
        assert loaded.get(name) is None  # left out, never half-loaded
        assert loaded.errors_for(name)
    assert loaded.get("shell-default") is not None  # the good ones still load
    assert loaded.errors_for("shell-default") == ()
    zone = loaded.get("swarm-zone-a")
    assert zone is not None and zone.placement == ("node.labels.ws-zone==a",)


def test_manage_py_check_names_path_and_field(tmp_path, settings) -> None:
    directory = _bad_dir(tmp_path)
    settings.WORKSPACE_TEMPLATES_DIR = directory
    invalidate_templates()
    try:
        with pytest.raises(SystemCheckError) as raised:
            call_command("check")
    finally:
        invalidate_templates()
    text = str(raised.value)
    for name, (_, field) in BAD_MANIFESTS.items():
        assert str(directory / name / "config.yaml") in text
        assert field in text
    assert "provisioning.E001" in text


def test_manage_py_check_passes_on_the_shipped_templates() -> None:
    loaded = load_templates(REPO / "workspace_templates")
    assert loaded.errors == ()
    assert {"shell-default", "hermes-default", "claude-code-default"} <= set(loaded.templates)
    call_command("check")  # raises SystemCheckError on any error


@pytest.mark.slow
def test_manage_py_check_subprocess_exit_status_and_output(tmp_path) -> None:
    directory = _bad_dir(tmp_path)
    env = service_env("http://127.0.0.1:1", WORKSPACE_TEMPLATES_DIR=str(directory))
    done = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert str(directory / "bad-timeout" / "config.yaml") in done.stderr
    assert "runtime_config.provision_timeout_seconds" in done.stderr
    # Reported at start-up of every process too (apps.ready), on the log.
    assert "template manifest error" in done.stderr


@pytest.mark.django_db
def test_sweeper_skips_a_row_whose_manifest_is_malformed_and_flips_the_others(
    tmp_path, settings, make_row
) -> None:
    """A broken manifest makes its rows' deadlines unknowable: those rows are reported and left
    alone (never flipped on a guessed default), and the sweep goes on with the others."""
    from datetime import timedelta

    from provisioning import sweeper
    from workspaces.models import Workspace
    from workspaces.status import WorkspaceStatus

    settings.WORKSPACE_TEMPLATES_DIR = _bad_dir(tmp_path)
    settings.PROVISION_TIMEOUT_SECONDS = None
    invalidate_templates()
    try:
        broken = make_row("bad-timeout", runtime="shell", age=timedelta(days=1))
        healthy = make_row("shell-default", age=timedelta(days=1))
        report = sweeper.sweep(use_lock=False)
    finally:
        invalidate_templates()
    assert [item.workspace_id for item in report.flipped] == [healthy.id]
    assert [item.workspace_id for item in report.skipped] == [broken.id]
    assert "runtime_config.provision_timeout_seconds" in report.skipped[0].reason
    assert Workspace.objects.get(id=broken.id).status == WorkspaceStatus.PROVISIONING
    assert Workspace.objects.get(id=healthy.id).status == WorkspaceStatus.FAILED


def test_registry_is_cached_and_reloads_when_a_file_changes(
    tmp_path, settings, monkeypatch
) -> None:
    directory = write_templates(tmp_path / "templates")
    settings.WORKSPACE_TEMPLATES_DIR = directory
    invalidate_templates()
    first = templates()
    assert templates() is first  # cached
    assert getattr(first.get("slowboot"), "provision_timeout_seconds", None) == 1200

    monkeypatch.setattr(manifests, "RELOAD_CHECK_SECONDS", 0.0)  # check on every call
    assert templates() is first  # nothing changed on disk: the same set
    manifest = directory / "slowboot" / "config.yaml"
    manifest.write_text("runtime: shell\nruntime_config:\n  provision_timeout_seconds: 1500\n")
    reloaded = templates()
    assert reloaded is not first
    assert getattr(reloaded.get("slowboot"), "provision_timeout_seconds", None) == 1500

    (directory / "added").mkdir()
    (directory / "added" / "config.yaml").write_text("runtime: shell\n")
    assert templates().get("added") is not None

    manifest.write_text("runtime: shell\nruntime_config:\n  provision_timeout_seconds: zero\n")
    broken = templates()
    assert broken.get("slowboot") is None
    assert [error.field for error in broken.errors_for("slowboot")] == [
        "runtime_config.provision_timeout_seconds"
    ]
    invalidate_templates()


def test_start_up_logs_every_malformed_manifest(tmp_path, settings, caplog: Any) -> None:
    from workspaces.apps import WorkspacesConfig

    settings.WORKSPACE_TEMPLATES_DIR = _bad_dir(tmp_path)
    invalidate_templates()
    try:
        with caplog.at_level(logging.WARNING, logger="workspaces"):
            WorkspacesConfig.ready(WorkspacesConfig("workspaces", manifests))
    finally:
        invalidate_templates()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "runtime_config.provision_timeout_seconds" in logged
    assert "bad-timeout/config.yaml" in logged


@pytest.mark.parametrize(
    ("folder", "text", "field"),
    [
        ("shell-x\n", "runtime: shell\n", "name"),
        ("newline", 'runtime: "shell\\n"\n', "runtime"),
        ("newline", 'runtime: shell\nenv:\n  "PATH_X\\n": x\n', "env.PATH_X\n"),
        ("newline", 'runtime: shell\nmembers: ["shell-default\\n"]\n', "members"),
        (
            "newline",
            'runtime: shell\nruntime_config:\n  required_env: ["API_KEY\\n"]\n',
            "runtime_config.required_env",
        ),
        ("newline", 'runtime: shell\nresources:\n  memory: "512m\\n"\n', "resources.memory"),
        (
            "newline",
            'runtime: shell\nplacement:\n  constraints: ["node.role==worker\\n"]\n',
            "placement.constraints",
        ),
    ],
)
def test_a_final_newline_passes_no_rule(tmp_path, folder, text, field) -> None:
    """Each rule is a whole match: a "$"-anchored pattern under re.match accepts a final newline."""
    good = tmp_path / "good.yaml"
    good.write_text(text.replace("\\n", ""))
    manifests.parse_manifest(folder.strip(), good)  # the newline alone is what is refused
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(manifests.InvalidManifest) as refused:
        manifests.parse_manifest(folder, path)
    assert refused.value.error.field == field
