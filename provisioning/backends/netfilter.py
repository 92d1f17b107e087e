"""What the host's two firewalls share (``process_firewall``: the process backend's nftables
table; ``docker_firewall``: the Docker bridges' iptables chain): the error they raise and the way
they run ``iptables``/``ip6tables``, by absolute path and one ``-restore --noflush`` transaction
at a time."""

from __future__ import annotations

import subprocess

from provisioning.backends.process_launch import system_program


class FirewallError(Exception):
    """A host firewall could not be read, installed or changed; the message says what failed."""


def restore(tool: str, lines: list[str]) -> subprocess.CompletedProcess[str]:
    """One ``<tool>-restore --noflush`` transaction of the filter table: all of it or nothing."""
    script = "\n".join(["*filter", *lines, "COMMIT", ""])
    return run([f"{tool}-restore", "-w", "--noflush"], script)


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a firewall tool by its absolute path on the system's PATH (it runs as root);
    ``FirewallError`` naming it when it is not installed."""
    program = system_program(argv[0])
    if program is None:
        raise FirewallError(f"{argv[0]} is not installed (apt-get install iptables)")
    try:
        return subprocess.run(
            [program, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"{argv[0]}: {exc}") from exc
