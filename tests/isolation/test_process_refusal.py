"""The process backend refuses to run workspaces it cannot isolate, naming the setting that
allows unisolated single-user development."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provisioning.backends.base import BackendUnavailable
from provisioning.backends.process import ProcessBackend
from provisioning.checks import check_process_isolation


def test_not_root_is_refused_at_start_up_and_by_the_backend(
    tmp_path: Path, settings, monkeypatch
) -> None:
    settings.WORKSPACE_BACKEND = "process"
    settings.WORKSPACE_PROCESS_ISOLATION = "uid"
    # The platform runs as root here; what an unprivileged deployment sees is the subject.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    [error] = check_process_isolation()
    assert error.id == "provisioning.E002"
    assert "WORKSPACE_PROCESS_ISOLATION=none" in error.msg
    with pytest.raises(BackendUnavailable) as raised:
        ProcessBackend(tmp_path / "data").check_available()
    assert "WORKSPACE_PROCESS_ISOLATION=none" in str(raised.value)

    settings.WORKSPACE_PROCESS_ISOLATION = "none"
    assert check_process_isolation() == []
    ProcessBackend(tmp_path / "data").check_available()


def test_a_firewall_that_cannot_be_installed_is_refused(tmp_path: Path, settings) -> None:
    settings.WORKSPACE_PROCESS_ISOLATION = "uid"
    # A chain name iptables rejects (too long): the install fails for real.
    settings.WORKSPACE_FIREWALL_CHAIN = "X" * 40
    with pytest.raises(BackendUnavailable) as raised:
        ProcessBackend(tmp_path / "data").check_available()
    message = str(raised.value)
    assert "firewall" in message and "WORKSPACE_PROCESS_ISOLATION=none" in message
