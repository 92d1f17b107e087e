"""A process workspace's boundary is what it is given: its own network namespace (one link to the
host) and its own /run, /tmp and /dev/shm. Tried from inside a real workspace (its uid, its
namespaces) against what the host has now, found by looking rather than by a list: every Unix
socket under /run and /var/run, and an abstract socket the test makes, each answering the host
first (the control)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from provisioning.backends import process_network
from provisioning.backends.base import BackendError, LaunchSpec
from provisioning.backends.process import ProcessBackend
from provisioning.backends.process_firewall import registry_port
from provisioning.backends.process_launch import alive, uid_processes
from provisioning.backends.process_network import link, link_name
from tests.isolation import create_online
from tests.isolation.test_process_isolation import PROBE, QUEUE, _probe_as, gateway
from tests.support import Worker, lifecycle_queue, next_backend_uid, wait_for
from workspaces.manifests import Template

SLEEPER = ("{python}", "-c", "import time; time.sleep(600)")

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def namespace_worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    worker = Worker(worker_env, concurrency=1, name="namespace", queues=QUEUE).start()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def _own_queue(use_session_templates: Path) -> Iterator[None]:
    with lifecycle_queue(QUEUE):
        yield


def _host_sockets() -> list[str]:
    """Every Unix socket file under /run and /var/run (whichever they are), found by walking."""
    found = set()
    for top in {os.path.realpath("/run"), os.path.realpath("/var/run")}:
        for folder, _, names in os.walk(top):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        found.add(path)
                except OSError:
                    continue
    return sorted(found)


@pytest.fixture
def abstract_listener() -> Iterator[str]:
    """A listener of the test's own on an abstract Unix socket (the host's network namespace);
    its name as the probe writes it (``@name``)."""
    name = f"ws-netns-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen(16)
        yield f"@{name}"


def test_a_workspace_sees_no_socket_of_the_host_and_reaches_only_registry_and_own_app(
    api, namespace_worker, instances, abstract_listener
) -> None:
    assert settings.WORKSPACE_PROCESS_ISOLATION == "uid"
    a = create_online(api, "ns", "shell-default", {}, timeout=60)
    assert a.app_port is not None
    data_dir = Path(settings.WORKSPACE_DATA_DIR)
    sockets = _host_sockets()
    targets = {
        "unix": [*sockets, abstract_listener],
        "tcp": [
            [gateway(a), registry_port()],
            ["127.0.0.1", a.app_port],
            [a.backend_state["address"], a.app_port],
        ],
        "list": [str(data_dir)],
    }

    # The control: from the host each of these answers (a socket nothing listens on any more is
    # left out: there is nothing to reach), and the proxy's way to the app, the link, works.
    control = _probe_as(None, targets)
    answering = [path for path in sockets if control["unix"][path] == "connected"]
    assert answering, sockets
    if os.path.exists("/run/postgresql/.s.PGSQL.5432"):
        assert "/run/postgresql/.s.PGSQL.5432" in answering
    assert control["unix"][abstract_listener] == "connected"
    assert control["tcp"][f"{a.backend_state['address']}:{a.app_port}"] == "connected"

    inside = _probe_as(a, targets)
    reached = {path: inside["unix"][path] for path in [*answering, abstract_listener]}
    assert all(v.startswith("refused") for v in reached.values()), reached
    tcp = inside["tcp"]
    # What it is given: the registry at its link's host end, and its own app.
    assert tcp[f"{gateway(a)}:{registry_port()}"] == "connected", tcp
    assert tcp[f"127.0.0.1:{a.app_port}"] == "connected", tcp
    assert tcp[f"{a.backend_state['address']}:{a.app_port}"] == "connected", tcp
    # The data folder: passable to its own folder, not listable (no other workspace's id).
    assert inside["list"][str(data_dir)].startswith("refused"), inside["list"]
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o711
    # The agent calls the platform at its link's host end.
    environ = Path(f"/proc/{a.backend_state['pid']}/environ").read_bytes().split(b"\0")
    platform_url = next(item for item in environ if item.startswith(b"PLATFORM_URL="))
    assert platform_url == f"PLATFORM_URL=http://{gateway(a)}:{registry_port()}".encode()
    # Nothing else answered: the three ways to the registry and its own app, no socket.
    assert json.dumps(inside).count('"connected"') == 3, inside


# -- the link's life: made per start, replaced, removed, never left behind ---------------------
@pytest.fixture
def backend() -> Iterator[ProcessBackend]:
    data = Path(tempfile.mkdtemp(prefix="ws-netns-test-"))
    data.chmod(0o711)
    made = ProcessBackend(data)
    yield made
    for info in made.list_instances():
        made.remove(uuid.UUID(info.workspace_id), {})
    shutil.rmtree(data, ignore_errors=True)


def _spec(backend: ProcessBackend) -> LaunchSpec:
    template = Template(name="t", path=backend.root, runtime="shell", command=SLEEPER)
    workspace_id = uuid.uuid4()
    env = {"WORKSPACE_ID": str(workspace_id), "PLATFORM_URL": "http://127.0.0.1:9"}
    return LaunchSpec(workspace_id, 1, template, env, uid=next_backend_uid())


def _link(name: str) -> dict[str, Any] | None:
    """``ip -j -d link show`` of the host's interface ``name``, None when there is none."""
    shown = subprocess.run(["ip", "-j", "-d", "link", "show", name], capture_output=True)
    return dict(json.loads(shown.stdout)[0]) if shown.returncode == 0 else None


def _addresses_in(pid: int) -> list[str]:
    """The IPv4 addresses of the network namespace of process ``pid``."""
    shown = subprocess.run(
        ["nsenter", f"--target={pid}", "--net", "--", "ip", "-j", "-4", "addr"],
        capture_output=True,
        check=True,
    )
    return [a["local"] for i in json.loads(shown.stdout) for a in i.get("addr_info", [])]


def test_a_leftover_link_is_replaced_and_removal_deletes_it(backend: ProcessBackend) -> None:
    spec = _spec(backend)
    name = link_name(spec.uid or 0)
    # What a crash could leave: an interface of that name on the host.
    peer = f"wsx{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        backend.prepare(spec, {})
        for _ in range(2):  # a start, then a restart: each replaces, never a name conflict
            state = backend.start(spec, {})
            shown = _link(name)
            assert shown is not None and "link_netnsid" in shown, shown  # its peer: elsewhere
            assert _link(peer) is None  # the leftover pair is gone
            pair = link(spec.uid or 0)
            assert state["address"] == pair.address
            assert _addresses_in(state["pid"]) == ["127.0.0.1", pair.address]
        backend.remove(spec.workspace_id, state)
        assert _link(name) is None
        backend.remove(spec.workspace_id, {})  # again: nothing left, no error
    finally:
        subprocess.run(["ip", "link", "del", peer], capture_output=True)


def test_a_launch_whose_link_fails_starts_nothing_and_leaves_no_link(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor waits for the link before it starts anything; when the worker fails (or dies)
    after making it, the monitor exits, and the kernel deletes the link with its namespace."""
    spec = _spec(backend)
    name = link_name(spec.uid or 0)
    monitors: list[int] = []
    real_wire = process_network.wire

    def wire_then_fail(pid: int, link_name: str, pair: Any) -> None:
        monitors.append(pid)
        real_wire(pid, link_name, pair)
        assert _link(name) is not None
        raise BackendError("the worker failed after wiring")

    monkeypatch.setattr(process_network, "wire", wire_then_fail)
    backend.prepare(spec, {})
    with pytest.raises(BackendError, match="failed after wiring"):
        backend.start(spec, {})
    [monitor] = monitors
    wait_for(lambda: not Path(f"/proc/{monitor}").exists(), timeout=5, message="monitor gone")
    wait_for(lambda: _link(name) is None, timeout=10, message="the link gone with its namespace")
    assert not backend._instance_file(spec.workspace_id).exists()
    assert uid_processes(spec.uid or 0) == []


# -- a half-made launch, or an earlier holder of the uid, is replaced by the next start ---------
# A worker that makes the link and then hangs (it never tells the monitor to go on), as a worker
# frozen mid-launch leaves it (one killed there closes the monitor's stdin: the monitor ends at
# once). Arguments: data folder, workspace id, uid, how long the monitor waits for its link, the
# command (JSON).
HANGING_LAUNCH = """
import json, sys, time, uuid
from pathlib import Path
import django
django.setup()
from provisioning.backends import process_launch, process_network
from provisioning.backends.base import LaunchSpec
from provisioning.backends.process import ProcessBackend
from workspaces.manifests import Template
root, workspace_id, uid, wait, command = sys.argv[1:6]
process_launch.LINK_WAIT_SECONDS = float(wait)
made = process_network.wire
def wire_then_hang(pid, name, pair):
    made(pid, name, pair)
    print("wired", flush=True)
    time.sleep(3600)
process_network.wire = wire_then_hang
template = Template(name="t", path=Path(root), runtime="shell", command=tuple(json.loads(command)))
env = {"WORKSPACE_ID": workspace_id, "PLATFORM_URL": "http://127.0.0.1:9"}
spec = LaunchSpec(uuid.UUID(workspace_id), 1, template, env, uid=int(uid))
ProcessBackend(Path(root)).start(spec, {})
"""


def _hang_a_launch(backend: ProcessBackend, spec: LaunchSpec, wait: float) -> subprocess.Popen:
    """Start ``spec``'s launch in a worker of its own that hangs once the link is made; returns
    that worker, its monitor waiting for the go-ahead."""
    hung = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HANGING_LAUNCH,
            str(backend.root),
            str(spec.workspace_id),
            str(spec.uid),
            str(wait),
            json.dumps(SLEEPER),
        ],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert hung.stdout is not None
    line = hung.stdout.readline()  # blocks until wired, or the worker failed
    assert line == "wired\n", (line, hung.communicate(timeout=5))
    return hung


def _launch_record(backend: ProcessBackend, spec: LaunchSpec) -> dict[str, Any]:
    return dict(json.loads(backend._launch_file(spec.workspace_id).read_text()))


def test_a_start_replaces_a_launch_whose_worker_hung_after_wiring(
    backend: ProcessBackend,
) -> None:
    """The redelivered cycle's start ends the half-made launch (its monitor, recorded before the
    link was made, is still waiting) and wires its own link in place of that one."""
    spec = _spec(backend)
    name = link_name(spec.uid or 0)
    backend.prepare(spec, {})
    hung = _hang_a_launch(backend, spec, wait=600)
    try:
        record = _launch_record(backend, spec)
        assert record["link"] == name and record["uid"] == spec.uid
        monitor = record["monitor_pid"]
        assert alive(monitor, None) and _link(name) is not None
        assert not backend._instance_file(spec.workspace_id).exists()  # nothing started yet

        started = time.monotonic()
        state = backend.start(spec, {})  # the cycle again, as a redelivery runs it
        took = time.monotonic() - started
        assert not alive(monitor, None), "the half-made launch's monitor lives on"
        assert _link(name) is not None
        assert _addresses_in(state["pid"]) == ["127.0.0.1", link(spec.uid or 0).address]
        assert _launch_record(backend, spec)["monitor_pid"] == state["monitor_pid"]
        assert took < 10, took
    finally:
        hung.kill()
        hung.wait()


def test_a_monitor_waits_for_its_link_for_a_bounded_time(backend: ProcessBackend) -> None:
    """Nobody starts the workspace again: the monitor of the hung launch gives up by itself, and
    its namespace and link go with it."""
    spec = _spec(backend)
    name = link_name(spec.uid or 0)
    backend.prepare(spec, {})
    hung = _hang_a_launch(backend, spec, wait=2)
    try:
        monitor = _launch_record(backend, spec)["monitor_pid"]
        wait_for(
            lambda: not alive(monitor, None),
            timeout=15,
            message="the monitor to give up waiting for its link",
        )
        wait_for(lambda: _link(name) is None, timeout=10, message="the link gone")
        assert uid_processes(spec.uid or 0) == []
    finally:
        hung.kill()
        hung.wait()


def _connect_from(pid: int, uid: int, host: str, port: int) -> str:
    """The probe's TCP connect from the namespaces of process ``pid``, as ``uid``."""
    argv = [
        "nsenter",
        f"--target={pid}",
        "--mount",
        "--net",
        "--",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        settings.WORKSPACE_PYTHON,
        str(PROBE),
        json.dumps({"tcp": [[host, port]]}),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return str(json.loads(done.stdout)["tcp"][f"{host}:{port}"])


def test_a_start_replaces_what_an_earlier_holder_of_its_uid_left(
    backend: ProcessBackend, live_server: Any
) -> None:
    """A workspace given a uid whose earlier holder still runs (its row gone, say) ends that
    holder and takes the link of the uid: the registry answers it at its gateway."""
    earlier = _spec(backend)
    later = _spec(backend)
    later = LaunchSpec(later.workspace_id, 1, later.template, later.env, uid=earlier.uid)
    uid = earlier.uid or 0
    pair = link(uid)
    for spec in (earlier, later):
        backend.prepare(spec, {})
    first = backend.start(earlier, {})
    second = backend.start(later, {})
    assert not alive(first["pid"], first["start_time"]), "the earlier holder runs on"
    assert not alive(first["monitor_pid"], None)
    assert uid_processes(uid) == [second["pid"]]
    # One link answers for the uid's addresses, the later workspace's.
    routes = subprocess.run(
        ["ip", "-j", "route", "show", f"{pair.address}/31"], capture_output=True, check=True
    )
    assert [route["dev"] for route in json.loads(routes.stdout)] == [link_name(uid)]
    assert _connect_from(second["pid"], uid, pair.gateway, registry_port()) == "connected"
