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


def _iptables(tool: str = "/usr/sbin/iptables") -> str:
    return subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True).stdout


def _chain(table: str, chain: str) -> list[str]:
    """The rules of one chain of the table, one per line (its hook line left out)."""
    text = _table(table)
    marker = f"chain {chain} {{"
    if marker not in text:
        return []
    body = text.split(marker, 1)[1].split("}", 1)[0]
    return [line.strip() for line in body.splitlines()[2:] if line.strip()]


def test_the_firewall_runs_in_process_whatever_the_path(
    tmp_path: Path, monkeypatch, settings
) -> None:
    """The links' rules are written through libnftables in the platform's own process: no program
    on the caller's PATH (an ``nft`` or an ``iptables`` earlier on it) is run for them, and the
    table lands in the kernel."""
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
    table = "WS-TEST-PATH"
    settings.WORKSPACE_FIREWALL_CHAIN = table
    try:
        firewall.ensure_workspace_firewall()
        assert f"tcp dport {firewall.registry_port()} return" in _table(table)
    finally:
        firewall.remove_workspace_firewall(table)
    assert not ran.exists(), ran.read_text()


def test_the_table_polices_what_comes_in_from_a_link_and_replaces_an_older_one(settings) -> None:
    """From an interface of the links' prefix with a source in their subnet: replies, and new TCP
    connections to the registry port on a host address; everything else refused, nothing
    forwarded. An earlier version's table of that name (per-uid rules on ``output``) and its
    iptables chains are replaced whole; the table can be removed."""
    table = "WS-TEST-FW"
    settings.WORKSPACE_FIREWALL_CHAIN = table
    firewall._installed.clear()
    uid = settings.WORKSPACE_UID_RANGE[0] + 7
    prefix, subnet = settings.PROCESS_LINK_PREFIX, settings.PROCESS_LINK_SUBNET
    port = firewall.registry_port()
    try:
        # What earlier versions left: iptables chains and a jump, an nft table with uid rules.
        for tool in ("/usr/sbin/iptables", "/usr/sbin/ip6tables"):
            for name in (table, f"{table}-APPS", f"{table}-U{uid}"):
                subprocess.run([tool, "-w", "-N", name], check=True)
            subprocess.run([tool, "-w", "-A", table, "-j", f"{table}-APPS"], check=True)
            subprocess.run([tool, "-w", "-I", "OUTPUT", "1", "-j", table], check=True)
        subprocess.run(
            ["/usr/sbin/nft", "-f", "-"],
            input=(
                f"add table inet {table}\n"
                f"add chain inet {table} u{uid}\n"
                f"add rule inet {table} u{uid} tcp dport 30002 accept\n"
                f"add chain inet {table} output "
                "{ type filter hook output priority filter ; }\n"
                f"add rule inet {table} output meta skuid {uid} jump u{uid}\n"
            ),
            text=True,
            check=True,
        )
        firewall.ensure_workspace_firewall()
        for tool in ("/usr/sbin/iptables", "/usr/sbin/ip6tables"):
            assert table not in _iptables(tool)
        listed = _table(table)
        assert "chain output" not in listed and f"chain u{uid}" not in listed
        head = [f'iifname != "{prefix}*" return', f"ip saddr != {subnet} return"]
        assert _chain(table, "input") == [
            *head,
            "ct state established,related return",
            f"fib daddr type local tcp dport {port} return",
            "meta l4proto tcp reject with tcp reset",
            "reject",
        ]
        assert _chain(table, "forward") == [
            *head,
            "meta l4proto tcp reject with tcp reset",
            "reject",
        ]
        firewall._installed.clear()  # as another worker process would, installing again
        firewall.ensure_workspace_firewall()
        assert _table(table) == listed
    finally:
        firewall.remove_workspace_firewall(table)
    assert _table(table) == ""
    firewall.remove_workspace_firewall(table)  # nothing left: no error
