"""docs/configuration.md is the reference the settings' own declarations generate, and complete."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from project import env

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = sorted((ROOT / "project" / "settings").glob("*.py"))
REFERENCE = ROOT / "docs" / "configuration.md"


def _names_read_by_settings() -> set[str]:
    """Every variable the settings read through a reader of project.env, found in their source."""
    names: set[str] = set()
    nodes = [
        node for part in SETTINGS for node in ast.walk(ast.parse(part.read_text(encoding="utf-8")))
    ]
    for node in nodes:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id.startswith("env_")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def test_every_variable_settings_reads_is_documented() -> None:
    names = _names_read_by_settings()
    assert len(names) > 100
    undeclared = sorted(names - set(env.load_declarations()))
    assert not undeclared, f"no doc= on these readers in project/settings/: {undeclared}"
    text = REFERENCE.read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"| `{name}` |" not in text)
    assert not missing, f"missing from docs/configuration.md: {missing}"


def test_reference_is_the_generated_text() -> None:
    # A fresh interpreter, with none of the variables set: the reference must not depend on the
    # environment of whoever generated it (a computed default needs shown=).
    clean = {
        key: value for key, value in os.environ.items() if key not in _names_read_by_settings()
    }
    clean["DJANGO_SETTINGS_MODULE"] = "project.settings"
    generated = subprocess.run(
        [sys.executable, "-m", "project.env"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert generated == REFERENCE.read_text(encoding="utf-8"), (
        "docs/configuration.md is not the generated text: run "
        "`.venv/bin/python -m project.env > docs/configuration.md`"
    )


def test_reference_does_not_depend_on_the_environment() -> None:
    declared = env.load_declarations()
    assert env.render_reference(declared) == REFERENCE.read_text(encoding="utf-8")


def test_a_reader_without_a_known_section_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="section"):
        env.env_int("NOT_A_SETTING", 1, environ={}, doc="text", section="nowhere")
    assert "NOT_A_SETTING" not in env.DECLARED


def test_a_section_marker_puts_the_readers_after_it_in_its_section(monkeypatch: Any) -> None:
    monkeypatch.setattr(env, "_current_section", "")
    with pytest.raises(ImproperlyConfigured, match="no section"):
        env.env_int("NOT_A_SETTING_BEFORE", 1, environ={}, doc="text")
    with pytest.raises(ImproperlyConfigured, match="SECTIONS"):
        env.section("nowhere")
    env.section("gate")
    env.env_int("NOT_A_SETTING_AFTER", 1, environ={}, doc="text")
    assert env.DECLARED.pop("NOT_A_SETTING_AFTER").section == "gate"
    assert "NOT_A_SETTING_BEFORE" not in env.DECLARED
