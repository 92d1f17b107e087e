"""Run the Procfile's processes under supervisord: one crashed process is restarted, the others
keep running (honcho, which ran them before, stopped every process when one died).

``python -m project.supervise [Procfile]`` writes ``supervisord.conf`` into the run folder
(``RUN_DIR``, default ``var/``: its socket and pidfile go there too) with one
``[program:<name>]`` section per Procfile line and prints its path; ``bin/run`` then execs
``supervisord`` with it. The Procfile stays the one list of processes: adding a line adds a
supervised program. Each command runs through ``sh -c 'exec …'`` so the Procfile's shell syntax
(``${BIND:-127.0.0.1:8000}``) keeps working and signals reach the program itself.

Operators: ``.venv/bin/supervisorctl -c var/supervisord.conf status|restart <name>|tail <name>``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
PROCFILE_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_-]+):\s*(?P<command>.+)$")

# Per program: restarted whenever it exits; a program that dies within STARTSECS of starting
# counts as a failed start and is retried with supervisord's growing delay (1 s more each try).
STARTSECS = 3
STARTRETRIES = 100
# A worker finishing its task on SIGTERM (warm shutdown) gets this long before SIGKILL.
STOPWAITSECS = 30


def parse_procfile(text: str) -> list[tuple[str, str]]:
    """``(name, command)`` per Procfile line; blank lines and ``#`` comments are skipped."""
    programs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PROCFILE_LINE.match(line.strip())
        if match is None:
            raise ValueError(f"Procfile line {number} is not 'name: command': {line!r}")
        programs.append((match["name"], match["command"].strip()))
    names = [name for name, _ in programs]
    if len(set(names)) != len(names):
        raise ValueError(f"Procfile names a process twice: {names}")
    return programs


def _escape(value: str) -> str:
    # supervisord expands %(name)s in its values: a literal % is written %%.
    return value.replace("%", "%%")


def render(programs: list[tuple[str, str]], *, directory: Path, run_dir: Path) -> str:
    sections = [
        "[supervisord]",
        "nodaemon=true",
        # supervisord's own lines (a program exited, was restarted) go with the programs' output.
        "logfile=/dev/stdout",
        "logfile_maxbytes=0",
        f"pidfile={run_dir / 'supervisord.pid'}",
        "",
        "[unix_http_server]",
        f"file={run_dir / 'supervisor.sock'}",
        "chmod=0700",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{run_dir / 'supervisor.sock'}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
    ]
    for name, command in programs:
        sections += [
            "",
            f"[program:{name}]",
            f"command=/bin/sh -c {_escape(shlex.quote('exec ' + command))}",
            f"directory={directory}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={STARTSECS}",
            f"startretries={STARTRETRIES}",
            f"stopwaitsecs={STOPWAITSECS}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
        ]
    return "\n".join(sections) + "\n"


def main(argv: list[str]) -> int:
    procfile = Path(argv[1]) if len(argv) > 1 else BASE_DIR / "Procfile"
    run_dir = (BASE_DIR / os.environ.get("RUN_DIR", "var")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "supervisord.conf"
    programs = parse_procfile(procfile.read_text())
    config.write_text(render(programs, directory=procfile.resolve().parent, run_dir=run_dir))
    print(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
