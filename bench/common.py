"""Shared helpers for benchmarks: Django setup on a dedicated database, timing, summaries.

Every benchmark module exposes ``run(repeats: int) -> list[Figure]``; ``python -m bench`` runs
them all and writes docs/benchmarks.md. A figure is measured side by side with its floor (the
raw engine, the bare Redis call, a peer) in the same run, and reported as a ratio.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def setup_django(database: str = "workspaces_bench", redis_db: int = 14) -> None:
    """Point Django at a bench database (created and migrated if missing) and Redis db 14."""
    os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{database}")
    os.environ.setdefault("REDIS_URL", f"redis://127.0.0.1:6379/{redis_db}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from project import bootstrap

    bootstrap.main()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Figure:
    """One measured figure, with its floor measured in the same run."""

    name: str
    unit: str
    samples: list[float]
    floor_name: str | None = None
    floor_samples: list[float] = field(default_factory=list)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def _stats(samples: list[float]) -> dict[str, float]:
        return {
            "min": min(samples),
            "median": statistics.median(samples),
            "max": max(samples),
        }

    @property
    def stats(self) -> dict[str, float]:
        return self._stats(self.samples)

    @property
    def floor_stats(self) -> dict[str, float] | None:
        return self._stats(self.floor_samples) if self.floor_samples else None

    @property
    def ratio(self) -> float | None:
        floor = self.floor_stats
        if not floor or not floor["median"]:
            return None
        return self.stats["median"] / floor["median"]

    def line(self) -> str:
        s = self.stats
        text = f"{self.name}: {s['min']:.4g} / {s['median']:.4g} / {s['max']:.4g} {self.unit}"
        if self.floor_stats is not None:
            f = self.floor_stats
            text += (
                f"  | floor {self.floor_name}: {f['min']:.4g} / {f['median']:.4g} / "
                f"{f['max']:.4g} {self.unit}  | ratio {self.ratio:.2f}"
            )
        return text


def write_block(path: Path, begin: str, end: str, section: list[str]) -> None:
    """Replace a benchmark's block of the report (between its markers), or append it."""
    block = "\n".join([begin, *section, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def shell_rows(
    owner: Any, names: list[str], statuses: tuple[str, ...] = ("stopped",), **fields: Any
) -> list[Any]:
    """Workspace rows of ``owner`` written straight to the table (one ``bulk_create``), a row per
    name: template ``shell-default`` on the process backend, statuses taken in turn from
    ``statuses``, any other column from ``fields``. Nothing runs for them."""
    from workspaces.models import Workspace

    return Workspace.objects.bulk_create(
        (
            Workspace(
                owner=owner,
                name=name,
                template="shell-default",
                runtime="shell",
                backend="process",
                status=statuses[index % len(statuses)],
                **fields,
            )
            for index, name in enumerate(names)
        ),
        batch_size=2000,
    )


def postgres_backends(database: str) -> set[int]:
    """The pids of PostgreSQL's server processes connected to ``database`` (this process's own
    connection aside)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        )
        return {int(row[0]) for row in cursor.fetchall()}


def call_json(
    port: int, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    """One HTTP request to the loopback's ``port`` with a JSON body (when given); the status and
    the answer, parsed as JSON when it is JSON (else its text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers = {**headers, "Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, (json.loads(data) if data else {})
        except ValueError:
            return response.status, data.decode(errors="replace")
    finally:
        conn.close()


def get_latencies(
    conn: http.client.HTTPConnection, path: str, token: str | None, requests: int
) -> list[float]:
    """Seconds per ``GET path`` (with the API token, when given), ``requests`` times in a row on
    one connection; any answer but 200 fails."""
    headers = {"Authorization": f"Token {token}"} if token else {}
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        samples.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status}")
    return samples


def print_figures(figures: list[Figure]) -> None:
    """A module run on its own (``python -m bench.<name>``): its figures and their notes."""
    for figure in figures:
        print(figure.line())
        if figure.notes:
            print(f"  {figure.notes}")
        for key in ("backend_calls", "engine_requests"):
            if figure.extra.get(key):
                print(f"  {key.replace('_', ' ')}: {figure.extra[key]}")
