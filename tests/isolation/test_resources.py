"""The manifest's `resources` block: parsed and validated with the manifest, applied to the
container by the Docker backend, documented defaults otherwise."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest

from provisioning.backends.base import LaunchSpec
from provisioning.backends.docker import DockerBackend
from tests.support import next_backend_uid
from workspaces.manifests import InvalidManifest, Resources, parse_manifest, templates


def _manifest(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "limited"
    folder.mkdir()
    (folder / "config.yaml").write_text(text)
    return folder / "config.yaml"


def test_resources_are_parsed(tmp_path: Path) -> None:
    path = _manifest(
        tmp_path, "runtime: shell\nresources:\n  memory: 256m\n  cpus: 0.5\n  pids: 64\n"
    )
    template = parse_manifest("limited", path)
    assert template.resources == Resources(memory="256m", cpus=0.5, pids=64)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("memory: lots", "resources.memory"),
        ("cpus: -1", "resources.cpus"),
        ("cpus: true", "resources.cpus"),
        ("pids: 0", "resources.pids"),
        ("disk: 1g", "resources.disk"),
    ],
)
def test_bad_resources_name_the_field(tmp_path: Path, block: str, field: str) -> None:
    path = _manifest(tmp_path, f"runtime: shell\nresources:\n  {block}\n")
    with pytest.raises(InvalidManifest) as raised:
        parse_manifest("limited", path)
    assert raised.value.error.field == field


@pytest.mark.docker
def test_the_manifests_resources_are_applied_to_the_container(docker_engine: Any) -> None:
    base = templates().get("shell-default")
    assert base is not None
    template = dataclasses.replace(base, resources=Resources(memory="256m", cpus=0.5, pids=64))
    workspace_id = uuid.uuid4()
    spec = LaunchSpec(
        workspace_id,
        1,
        template,
        {"WORKSPACE_ID": str(workspace_id), "WORKSPACE_TOKEN": "t", "PLATFORM_URL": "http://x:9"},
        uid=next_backend_uid(),
    )
    backend = DockerBackend()
    try:
        backend.prepare(spec, {})
        host_config = docker_engine.containers.get(f"ws-{workspace_id}").attrs["HostConfig"]
        assert host_config["Memory"] == 256 * 1024 * 1024
        assert host_config["NanoCpus"] == 500_000_000
        assert host_config["PidsLimit"] == 64
    finally:
        backend.remove(workspace_id, {})
