"""The process backend refuses to run workspaces it cannot isolate, naming the setting that
allows unisolated single-user development."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from provisioning.backends import process_firewall as firewall
from provisioning.backends import process_launch
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
    # A name that cannot name the nftables table: nothing is installed, and the backend says so.
    settings.WORKSPACE_FIREWALL_CHAIN = "WS ISOLATION; flush ruleset"
    with pytest.raises(BackendUnavailable) as raised:
        ProcessBackend(tmp_path / "data").check_available()
    message = str(raised.value)
    assert "firewall" in message and "WORKSPACE_PROCESS_ISOLATION=none" in message
    assert "WORKSPACE_FIREWALL_CHAIN" in message


def _table(table: str) -> str:
    """``nft list table`` as the nft program prints it ("" when there is no such table)."""
    listed = subprocess.run(
        ["/usr/sbin/nft", "list", "table", "inet", table], capture_output=True, text=True
    )
    return listed.stdout if listed.returncode == 0 else ""


def _uid_rules(table: str, uid: int) -> list[str]:
    """The rules of a uid's chain, one per line."""
    text = _table(table)
    marker = f"chain u{uid} {{"
    if marker not in text:
        return []
    body = text.split(marker, 1)[1].split("}", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def _iptables(tool: str = "/usr/sbin/iptables") -> str:
    return subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True).stdout


def test_the_firewall_runs_in_process_whatever_the_path(
    tmp_path: Path, monkeypatch, settings
) -> None:
    """The uids' rules are written through libnftables in the platform's own process: no program
    on the caller's PATH (an ``nft`` or an ``iptables`` earlier on it) is run for them, and the
    rule lands in the kernel's table, and comes out of it again."""
    decoy = tmp_path / "bin"
    decoy.mkdir()
    ran = tmp_path / "decoy-ran"
    for name in ("nft", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore"):
        script = decoy / name
        script.write_text(f"#!/bin/sh\necho {name} >> {ran}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{decoy}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(process_launch, "_tools", {})
    monkeypatch.setattr(firewall, "_installed", set())
    uid, port = 200_998, 40_998

    table = settings.WORKSPACE_FIREWALL_CHAIN
    firewall.allow_own_app(uid, port)
    try:
        assert _uid_rules(table, uid) == [f"tcp dport {port} accept"]
        assert f"{uid} : jump u{uid}" in _table(table)
    finally:
        firewall.revoke_own_app(uid)
    assert not ran.exists(), ran.read_text()
    assert _uid_rules(table, uid) == []


def test_a_uids_rule_is_replaced_whole_and_emptied_on_removal(settings) -> None:
    """Each start writes the uid's chain whole (the older port goes in the same transaction) and
    the uid has one entry in the map, whichever process wrote it before; removal takes the chain
    and the entry out, leaving other uids' alone; the
    main chain is what the settings say; an earlier version's iptables chains of the same name
    go when a process installs the table; and the table can be removed."""
    table = "WS-TEST-FW"
    settings.WORKSPACE_FIREWALL_CHAIN = table
    firewall._installed.clear()
    uid = settings.WORKSPACE_UID_RANGE[0] + 7
    low, high = settings.WORKSPACE_UID_RANGE
    try:
        # What an earlier version left in both families: its chains, the uid's, the jump.
        for tool in ("/usr/sbin/iptables", "/usr/sbin/ip6tables"):
            for name in (table, f"{table}-APPS", f"{table}-U{uid}"):
                subprocess.run([tool, "-w", "-N", name], check=True)
            subprocess.run([tool, "-w", "-A", table, "-j", f"{table}-APPS"], check=True)
            subprocess.run([tool, "-w", "-I", "OUTPUT", "1", "-j", table], check=True)
        firewall.ensure_workspace_firewall()
        for tool in ("/usr/sbin/iptables", "/usr/sbin/ip6tables"):
            assert table not in _iptables(tool)
        listed = _table(table)
        assert f"meta skuid != {low}-{high} return" in listed
        assert f"tcp dport {firewall.registry_port()} return" in listed
        assert "meta skuid vmap @uids" in listed
        for port in (30002, 30003):
            firewall.allow_own_app(uid, port)
            firewall._installed.clear()  # as another worker process would, installing first
            assert _uid_rules(table, uid) == [f"tcp dport {port} accept"]
            assert _table(table).count(f"{uid} : jump u{uid}") == 1
        firewall.ensure_workspace_firewall()  # rebuilding the main chain keeps the uids' rules
        assert _uid_rules(table, uid) == ["tcp dport 30003 accept"]
        other = uid + 1
        firewall.allow_own_app(other, 30004)
        firewall.revoke_own_app(uid)
        listed = _table(table)
        # The removed workspace's uid keeps neither a chain nor a map entry; the other uid's stay.
        assert f"chain u{uid} " not in listed and f"{uid} : jump" not in listed
        assert _uid_rules(table, other) == ["tcp dport 30004 accept"]
        assert f"{other} : jump u{other}" in listed
        firewall.revoke_own_app(uid)  # again: nothing to take out, no error
        firewall.revoke_own_app(uid + 2)  # a uid that never ran: no error
        assert _uid_rules(table, uid) == [] and f"chain u{uid + 2} " not in _table(table)
        firewall.allow_own_app(uid, 30005)  # the uid handed out again gets its chain back
        assert _uid_rules(table, uid) == ["tcp dport 30005 accept"]
        assert _table(table).count(f"{uid} : jump u{uid}") == 1
    finally:
        firewall.remove_workspace_firewall(table)
    assert _table(table) == ""
    firewall.remove_workspace_firewall(table)  # nothing left: no error
