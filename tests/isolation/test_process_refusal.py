"""The process backend refuses to run workspaces it cannot isolate, naming the setting that
allows unisolated single-user development."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from provisioning.backends import firewall, process_launch
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


def test_the_firewall_runs_the_systems_iptables_whatever_the_path(
    tmp_path: Path, monkeypatch, settings
) -> None:
    """The firewall's tools run as root: an ``iptables`` earlier on the caller's PATH is not the
    one that runs; the rule lands in the real table, and comes out of it again."""
    decoy = tmp_path / "bin"
    decoy.mkdir()
    ran = tmp_path / "decoy-ran"
    for name in ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore"):
        script = decoy / name
        script.write_text(f"#!/bin/sh\necho {name} >> {ran}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{decoy}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(process_launch, "_tools", {})
    monkeypatch.setattr(firewall, "_installed", set())
    uid, port = 200_998, 40_998

    firewall.allow_own_app(uid, port)
    try:
        listed = subprocess.run(
            [
                "/usr/sbin/iptables",
                "-w",
                "-S",
                firewall.apps_chain(settings.WORKSPACE_FIREWALL_CHAIN),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"--uid-owner {uid} " in listed and f"--dport {port} " in listed
    finally:
        firewall.revoke_own_app(uid)
    assert not ran.exists(), ran.read_text()
    listed = subprocess.run(
        ["/usr/sbin/iptables", "-w", "-S", firewall.apps_chain(settings.WORKSPACE_FIREWALL_CHAIN)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"--uid-owner {uid} " not in listed
