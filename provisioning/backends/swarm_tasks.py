"""Reading what a swarm manager says about a workspace service's tasks and the nodes they run on:
which task says what runs now, whether it runs, and how to describe it in an event."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provisioning.backends.engine import generation_of

# Task states from which a task never runs again.
FAILED = frozenset({"failed", "rejected", "orphaned", "remove", "shutdown", "complete"})


def container_labels(task: Mapping[str, Any]) -> dict[str, str]:
    """The labels of the task's container (the platform's labels, on every task's spec)."""
    return dict((task.get("Spec", {}).get("ContainerSpec") or {}).get("Labels") or {})


def exit_code(task: Mapping[str, Any]) -> int | None:
    code = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ExitCode")
    return None if code is None else int(code)


def current(tasks: list[dict[str, Any]], generation: int | None = None) -> dict[str, Any] | None:
    """The newest task (of ``generation`` when given): the one that says what runs now."""
    if generation is not None:
        tasks = [t for t in tasks if generation_of(container_labels(t)) == generation]
    if not tasks:
        return None
    return max(tasks, key=lambda t: t.get("Meta", {}).get("Version", {}).get("Index", 0))


def describe(task: Mapping[str, Any], nodes: Mapping[str, dict[str, Any]]) -> str:
    status = task.get("Status") or {}
    text = str(status.get("State") or "unknown")
    code = (status.get("ContainerStatus") or {}).get("ExitCode")
    if code is not None and status.get("State") != "running":
        text += f" with code {code}"
    if status.get("Err"):
        text += f" ({status['Err']})"
    node = nodes.get(task.get("NodeID", ""))
    if node is not None:
        text += f" on node {node_name(node)}"
        if node_down(node):
            text += f", which is {node.get('Status', {}).get('State', 'down')}"
    return text


def running(task: Mapping[str, Any] | None, nodes: Mapping[str, dict[str, Any]]) -> bool:
    if task is None or (task.get("Status") or {}).get("State") != "running":
        return False
    if task.get("DesiredState") != "running":
        return False
    # A node that went away leaves its tasks looking running: its state is the truth.
    node = nodes.get(task.get("NodeID", ""))
    return node is None or not node_down(node)


def ended(task: Mapping[str, Any]) -> bool:
    """The task has ended and is not meant to run again."""
    state = (task.get("Status") or {}).get("State", "")
    return state in FAILED and task.get("DesiredState", "") in FAILED


def node_name(node: Mapping[str, Any]) -> str:
    hostname = (node.get("Description") or {}).get("Hostname") or ""
    address = (node.get("Status") or {}).get("Addr") or ""
    return f"{hostname} ({address}, {str(node.get('ID', ''))[:12]})"


def node_down(node: Mapping[str, Any]) -> bool:
    return (node.get("Status") or {}).get("State") != "ready"
