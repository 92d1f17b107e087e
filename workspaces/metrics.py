"""Prometheus metrics, served at ``/metrics`` (``prometheus_client``).

Two kinds:

* **Counted where they happen** (cycle durations, provisioning time to online, sweep and
  reconcile results, gate waits), in whichever process does the work: a gunicorn worker (agents
  register through the API) or a Celery pool child. With several processes, set
  ``PROMETHEUS_MULTIPROC_DIR`` to one empty folder shared by web, worker and beat (on one host):
  every process writes its samples there and ``/metrics`` sums them (``MultiProcessCollector``).
  Without it, ``/metrics`` shows the web process's own samples only.
* **Read at scrape time** (workspaces by status and backend, queue depth): one ``GROUP BY`` in
  PostgreSQL and one ``LLEN`` per queue in Redis, so they are true whichever process asks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, cast

from django.conf import settings
from django.db.models import Count
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from workspaces.manifests import pool_size, pooled_templates
from workspaces.models import Workspace
from workspaces.redis_client import get_redis
from workspaces.status import DesiredState, WorkspaceStatus

logger = logging.getLogger(__name__)

CYCLE_DURATION = Histogram(
    "workspace_cycle_duration_seconds",
    "Time one lifecycle cycle held the gate, by action (provision, start, restart, stop, "
    "remove, reap) and outcome (done, abandoned when a newer cycle took over, replanned when a "
    "request changed the intent before the cycle began, error)",
    ["action", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
PROVISION_TO_ONLINE = Histogram(
    "workspace_provision_to_online_seconds",
    "From the start of a provisioning cycle to the agent's registration (online)",
    ["runtime", "backend"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
POOL_CLAIMS = Counter(
    "workspace_pool_claims_total",
    "Creates served by a warm pool's member, by template and backend",
    ["template", "backend"],
)
POOL_REFILL_SECONDS = Histogram(
    "workspace_pool_refill_seconds",
    "From a pool member's insert to its agent running and waiting (ready to claim)",
    ["template", "backend"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
POOL_CLAIM_FALLBACKS = Counter(
    "workspace_pool_claim_fallbacks_total",
    "Claims whose member could not take the hand-over (it had died): started cold instead",
    ["template", "backend"],
)
SWEEP_RESULTS = Counter(
    "workspace_sweep_results_total",
    "What the beat sweeps did, by sweep and result (flipped, left_alone, skipped, "
    "deferred, overlapped, offline, redriven)",
    ["sweep", "result"],
)
RECONCILE_RESULTS = Counter(
    "workspace_reconcile_results_total",
    "Reconciliation passes and what they found (passes, disagreements, repairs, "
    "skipped_busy, errors, unavailable)",
    ["result"],
)
GATE_BUSY = Counter(
    "workspace_gate_busy_total",
    "Converge tasks that found the workspace's gate held by another cycle and came back later",
)

GATE_WAIT = Histogram(
    "workspace_gate_wait_seconds",
    "From a caller first finding a workspace's gate held by another cycle to the gate being "
    "taken again (the gate never blocks: the caller came back later)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)


def record_sweep(sweep: str, counts: Mapping[str, int]) -> None:
    for result, count in counts.items():
        if count:
            SWEEP_RESULTS.labels(sweep=sweep, result=result).inc(count)


def record_reconcile(summary: Mapping[str, Any]) -> None:
    RECONCILE_RESULTS.labels(result="passes").inc()
    for result in ("disagreements", "repairs", "skipped_busy", "errors"):
        if summary.get(result):
            RECONCILE_RESULTS.labels(result=result).inc(int(summary[result]))
    for _backend in summary.get("unavailable") or ():
        RECONCILE_RESULTS.labels(result="unavailable").inc()


class StateCollector(Collector):
    """Gauges read at scrape time from PostgreSQL and Redis."""

    def collect(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "workspaces", "Workspaces by status and backend", labels=["status", "backend"]
        )
        counts = {
            (row["status"], row["backend"]): row["n"]
            for row in Workspace.objects.filter(pool="")
            .values("status", "backend")
            .annotate(n=Count("id"))
        }
        backends = sorted({backend for _, backend in counts} | set(settings.WORKSPACE_BACKENDS))
        # Every status appears (0 included), so a dashboard's series never vanish.
        for status in WorkspaceStatus.values:
            for backend in backends:
                by_status.add_metric([status, backend], counts.get((status, backend), 0))
        yield by_status
        yield from _pool_gauges()

        depth = GaugeMetricFamily(
            "celery_queue_length", "Tasks waiting in each Celery queue (Redis)", labels=["queue"]
        )
        redis = get_redis()
        for queue in (settings.CELERY_TASK_DEFAULT_QUEUE, settings.CELERY_SWEEP_QUEUE):
            # kombu keeps one list per queue (and one per priority step when priorities are used).
            keys = [queue, *(f"{queue}\x06\x16{step}" for step in (3, 6, 9))]
            depth.add_metric([queue], sum(cast(int, redis.llen(key)) for key in keys))
        yield depth


def _pool_gauges() -> Iterator[Metric]:
    """Warm pools: the size asked for (``desired``) and the members by state, per template."""
    gauges = {
        name: GaugeMetricFamily(f"workspace_pool_{name}", text, labels=["template", "backend"])
        for name, text in (
            ("desired", "The pool size the manifest or WORKSPACE_POOL_SIZES asks for"),
            ("ready", "Members running with their agent waiting: claimable now"),
            ("starting", "Members being made (their cycle has not finished)"),
            ("failed", "Members whose cycle failed or whose instance died (to be replaced)"),
        )
    }
    backend = settings.WORKSPACE_BACKEND
    counts: dict[tuple[str, str], int] = {}
    rows = (
        Workspace.objects.exclude(pool="")
        .exclude(status=WorkspaceStatus.REMOVED)
        .filter(backend=backend)
        .values("pool", "status", "is_running", "desired_state")
        .annotate(n=Count("id"))
    )
    for row in rows:
        if row["status"] == WorkspaceStatus.FAILED:
            state = "failed"
        elif row["desired_state"] != DesiredState.RUNNING:
            continue  # retired, on its way out
        elif row["status"] == WorkspaceStatus.PROVISIONING and row["is_running"]:
            state = "ready"
        else:
            state = "starting"
        counts[(row["pool"], state)] = counts.get((row["pool"], state), 0) + row["n"]
    names = {template.name: pool_size(template) for template in pooled_templates()}
    names.update({pool: names.get(pool, 0) for pool, _ in counts})
    for name, size in sorted(names.items()):
        gauges["desired"].add_metric([name, backend], size)
        for state in ("ready", "starting", "failed"):
            gauges[state].add_metric([name, backend], counts.get((name, state), 0))
    yield from gauges.values()


def render() -> tuple[bytes, str]:
    """The exposition text for one scrape and its content type."""
    state = CollectorRegistry(auto_describe=True)
    state.register(StateCollector())
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        counted = CollectorRegistry()
        MultiProcessCollector(counted)
        body = generate_latest(counted)
    else:
        body = generate_latest(REGISTRY)
    return body + generate_latest(state), CONTENT_TYPE_LATEST
