"""The Swarm backend's ``follow_logs`` on a real swarm: the service's log stream, followed across
the service's task being replaced by a new cycle's."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from provisioning.backends import backend_named, reset_backends
from provisioning.backends.base import InstanceChange, InstanceNotice, LaunchSpec
from tests.provisioning.test_follow_logs import Follow, line, notice, starts, texts
from workspaces.manifests import Template

pytestmark = pytest.mark.docker


def test_swarm_follower_streams_a_services_lines_across_a_new_task(
    swarm: Any, settings: Any, tmp_path: Path
) -> None:
    settings.SWARM_MANAGER_HOST = swarm.host
    reset_backends()
    backend = backend_named("swarm")
    workspace_id = uuid.uuid4()

    def spec(generation: int, word: str) -> LaunchSpec:
        script = f"i=0; while true; do echo {word} $i; i=$((i+1)); sleep 0.2; done"
        template = Template(
            name="t", path=tmp_path, runtime="shell", command=("/bin/sh", "-c", script)
        )
        return LaunchSpec(
            workspace_id,
            generation,
            template,
            {"WORKSPACE_ID": str(workspace_id), "PLATFORM_URL": "http://127.0.0.1:9"},
        )

    def run(launch: LaunchSpec) -> None:
        state = backend.prepare(launch, {})
        backend.write_config(launch, state, {"hello.txt": b"hi"})
        backend.start(launch, state)

    first = spec(1, "first")
    run(first)
    follow = Follow(
        backend.follow_logs(
            workspace_id, {}, tail=2, max_bytes=64 * 1024, max_line_bytes=200, poll_seconds=0.2
        )
    )
    try:
        follow.until(starts("first "))
        later = follow.until(starts("first "))
        assert later  # new lines keep coming while the task writes them

        run(spec(2, "second"))
        after = follow.until(line("second 2"))
        said = {item.change for item in after if isinstance(item, InstanceNotice)}
        assert said & {InstanceChange.RESTARTED, InstanceChange.STARTED}, said
        every = texts(follow.seen)
        assert len(every) == len(set(every))  # nothing twice
        assert every[-3:] == ["second 0", "second 1", "second 2"]

        backend.remove(workspace_id, {})
        follow.until(notice(InstanceChange.GONE))
    finally:
        follow.close()
        backend.remove(workspace_id, {})
        reset_backends()
