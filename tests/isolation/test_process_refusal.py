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

    chain = settings.WORKSPACE_FIREWALL_CHAIN
    firewall.allow_own_app(uid, port)
    try:
        assert _listed(firewall.uid_chain(chain, uid)) == [
            f"-N {chain}-U{uid}",
            f"-A {chain}-U{uid} -p tcp -m addrtype --dst-type LOCAL -m tcp --dport {port} "
            "-j ACCEPT",
        ]
        jump = f"-A {chain}-APPS -m owner --uid-owner {uid} -j {chain}-U{uid}"
        assert _listed(firewall.apps_chain(chain)).count(jump) == 1
    finally:
        firewall.revoke_own_app(uid)
    assert not ran.exists(), ran.read_text()
    assert _listed(firewall.uid_chain(chain, uid)) == [f"-N {chain}-U{uid}"]


def _listed(chain: str, tool: str = "/usr/sbin/iptables") -> list[str]:
    return subprocess.run(
        [tool, "-w", "-S", chain], capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_a_uids_rule_is_replaced_whole_with_one_jump_and_emptied_on_removal(settings) -> None:
    """Each start writes the uid's chain whole (the older port goes in the same transaction) and
    leaves one jump to it, whichever process wrote it before; removal empties it; the rules an
    earlier version wrote into the sub-chain directly, and a second jump, are taken out when a
    process reads it; and the chains can all be removed."""
    chain = "WS-TEST-FW"
    settings.WORKSPACE_FIREWALL_CHAIN = chain
    firewall._installed.clear()
    uid = settings.WORKSPACE_UID_RANGE[0] + 7
    apps = firewall.apps_chain(chain)
    jump = f"-A {apps} -m owner --uid-owner {uid} -j {chain}-U{uid}"
    try:
        firewall.ensure_workspace_firewall()
        # What an earlier version left: a rule of its own for a uid, in the sub-chain.
        legacy = (
            f"-A {apps} -p tcp -m owner --uid-owner {uid} -m addrtype --dst-type LOCAL "
            "-m tcp --dport 30001 -j ACCEPT"
        )
        subprocess.run(["/usr/sbin/iptables", "-w", *legacy.split()], check=True)
        firewall._installed.clear()
        firewall.ensure_workspace_firewall()
        assert legacy not in _listed(apps)
        for port in (30002, 30003):
            firewall.allow_own_app(uid, port)
            # As another worker process would, which reads the sub-chain when it first starts one.
            firewall._installed.clear()
            firewall._jumps.clear()
            for tool in ("/usr/sbin/iptables", "/usr/sbin/ip6tables"):
                rules = _listed(firewall.uid_chain(chain, uid), tool)
                assert [rule.split("--dport ")[-1] for rule in rules[1:]] == [f"{port} -j ACCEPT"]
                assert _listed(apps, tool).count(jump) == 1
        firewall.allow_own_app(uid, 30003)  # the jump is known: the uid's chain alone
        assert _listed(apps).count(jump) == 1
        # Two processes that both added the jump: the next one to read the sub-chain keeps one.
        subprocess.run(["/usr/sbin/iptables", "-w", *jump.split()], check=True)
        firewall._installed.clear()
        firewall._jumps.clear()
        firewall.ensure_workspace_firewall()
        assert _listed(apps).count(jump) == 1
        firewall.revoke_own_app(uid)
        assert _listed(firewall.uid_chain(chain, uid)) == [f"-N {chain}-U{uid}"]
    finally:
        firewall.remove_workspace_firewall(chain)
    names = subprocess.run(
        ["/usr/sbin/iptables", "-w", "-S"], capture_output=True, text=True, check=True
    ).stdout
    assert chain not in names
