"""Template manifests: ``<WORKSPACE_TEMPLATES_DIR>/<name>/config.yaml`` plus files to copy.

Loaded and validated as a whole; a malformed manifest is reported with its path and field and
left out, never raised into a caller such as the sweeper. The registry is cached per process and
reloaded when any file of the folder changes (checked at most once per ``RELOAD_CHECK_SECONDS``).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings

from workspaces.naming import ENV_NAME_RE, RESERVED_ENV, is_env_name

MANIFEST_NAME = "config.yaml"
RELOAD_CHECK_SECONDS = 1.0
# Every rule ends in \Z and is applied with fullmatch: "$" also matches before a final newline.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}\Z")
RUNTIME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}\Z")
_KNOWN_KEYS = {
    "runtime",
    "image",
    "command",
    "env",
    "config_mount",
    "members",
    "runtime_config",
    "resources",
    "app",
    "restart",
    "placement",
    "pool",
    "sandbox",
}
_KNOWN_POOL_KEYS = {"size"}
# A pool's size is bounded: each member holds a uid, a port and a running agent.
MAX_POOL_SIZE = 1000
_KNOWN_RESOURCE_KEYS = {"memory", "cpus", "pids"}
MEMORY_RE = re.compile(r"^[1-9][0-9]*[bkmg]?\Z")
_KNOWN_RUNTIME_KEYS = {"provision_timeout_seconds", "required_env", "idle_timeout_seconds"}
_KNOWN_APP_KEYS = {"port", "health_path", "command"}
RESTART_POLICIES = ("on-failure", "never")
# The container runtime a Docker workspace runs under: "runc", the engine's default (the host's
# kernel behind seccomp), or "gvisor", the engine's gVisor runtime (DOCKER_GVISOR_RUNTIME), a
# kernel of its own in user space between the workspace and the host's. The first is the default.
SANDBOXES = ("runc", "gvisor")


@dataclass(frozen=True)
class ManifestError:
    path: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Resources:
    """A container's limits (Docker backend). None: the DOCKER_DEFAULT_* setting applies."""

    memory: str | None = None  # "512m", "2g": as `docker run --memory`
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class AppSpec:
    """The web application a workspace serves through the proxy (manifest ``app`` block).

    ``port`` None means the platform allocates one (``port: auto``, the default) and passes it
    in ``WORKSPACE_APP_PORT``; ``command`` (run with ``sh -c`` by the agent; ``{python}`` is the
    platform's interpreter on the process backend) None means the agent serves a small page
    itself. The workspace is online only once ``health_path`` answers below 400."""

    port: int | None = None
    health_path: str = "/"
    command: str | None = None


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    runtime: str
    image: str | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    config_mount: str | None = None
    members: tuple[str, ...] = ()
    provision_timeout_seconds: int | None = None
    required_env: tuple[str, ...] = ()
    # None: the manifest does not say (IDLE_TIMEOUT_SECONDS applies); 0: never stopped for idling.
    idle_timeout_seconds: int | None = None
    resources: Resources = field(default_factory=Resources)
    app: AppSpec | None = None
    restart: str = "on-failure"
    # One of SANDBOXES; recorded on each workspace made from the template (Workspace.sandbox).
    sandbox: str = SANDBOXES[0]
    # Swarm placement constraints (``node.labels.zone==a``); other backends ignore them.
    placement: tuple[str, ...] = ()
    # Warm pool (``pool: {size: N}``): how many instances the platform keeps ready to claim;
    # WORKSPACE_POOL_SIZES overrides it (services.pools.pool_size is the one accessor).
    pool_size: int = 0
    # A digest of the manifest, the template's files and its image: a pool member made from an
    # older one is never claimed.
    fingerprint: str = ""

    @property
    def is_team(self) -> bool:
        return bool(self.members)

    def config_files(self) -> dict[str, bytes]:
        """Every file of the template folder except the manifest, keyed by relative path."""
        files: dict[str, bytes] = {}
        for path in sorted(self.path.rglob("*")):
            if path.is_file() and path.name != MANIFEST_NAME and not path.is_symlink():
                files[path.relative_to(self.path).as_posix()] = path.read_bytes()
        return files


class InvalidManifest(Exception):
    def __init__(self, error: ManifestError) -> None:
        super().__init__(str(error))
        self.error = error


def _fail(path: Path, field_name: str, message: str) -> InvalidManifest:
    return InvalidManifest(ManifestError(str(path), field_name, message))


def _str_list(path: Path, name: str, value: Any, pattern: re.Pattern[str] | None = None) -> tuple:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _fail(path, name, "must be a list of non-empty strings")
    if pattern is not None:
        for item in value:
            if not pattern.fullmatch(item):
                raise _fail(path, name, f"{item!r} is not a valid name")
    return tuple(value)


PLACEMENT_RE = re.compile(r"^[A-Za-z0-9_.\-]+ *(==|!=) *[^\s].*\Z")


def _placement(path: Path, value: Any) -> tuple[str, ...]:
    """``placement: {constraints: ["node.labels.zone==a"]}``: Swarm constraints, as given."""
    if value is None:
        return ()
    if not isinstance(value, dict) or set(value) - {"constraints"}:
        raise _fail(path, "placement", "must be a mapping with one key, constraints")
    constraints = value.get("constraints") or []
    if not isinstance(constraints, list):
        raise _fail(path, "placement.constraints", "must be a list of strings")
    for item in constraints:
        if not isinstance(item, str) or not PLACEMENT_RE.fullmatch(item):
            raise _fail(path, "placement.constraints", f"{item!r} is not like 'node.labels.x==y'")
    return tuple(constraints)


def _resources(path: Path, value: Any) -> Resources:
    if value is None:
        return Resources()
    if not isinstance(value, dict):
        raise _fail(path, "resources", "must be a mapping (memory, cpus, pids)")
    unknown = sorted(set(value) - _KNOWN_RESOURCE_KEYS)
    if unknown:
        raise _fail(path, f"resources.{unknown[0]}", "unknown key")
    memory = value.get("memory")
    if memory is not None and (not isinstance(memory, str) or not MEMORY_RE.fullmatch(memory)):
        raise _fail(path, "resources.memory", "must be a size like '512m' or '2g'")
    cpus = value.get("cpus")
    if cpus is not None and (
        isinstance(cpus, bool) or not isinstance(cpus, int | float) or cpus <= 0
    ):
        raise _fail(path, "resources.cpus", "must be a positive number")
    pids = value.get("pids")
    if pids is not None and (isinstance(pids, bool) or not isinstance(pids, int) or pids <= 0):
        raise _fail(path, "resources.pids", "must be a positive integer")
    return Resources(memory=memory, cpus=float(cpus) if cpus is not None else None, pids=pids)


def parse_manifest(name: str, manifest_path: Path) -> Template:
    """Parse and validate one manifest; raise ``InvalidManifest`` naming the path and field."""
    if not NAME_RE.fullmatch(name):
        raise _fail(manifest_path, "name", f"template folder name {name!r} is not a valid name")
    try:
        data = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(manifest_path, "(file)", f"cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise _fail(manifest_path, "(yaml)", f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(manifest_path, "(root)", "must be a mapping")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise _fail(manifest_path, unknown[0], "unknown key")

    runtime = data.get("runtime")
    if not isinstance(runtime, str) or not RUNTIME_RE.fullmatch(runtime):
        raise _fail(manifest_path, "runtime", "is required: a lowercase name like 'claude-code'")
    image = data.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise _fail(manifest_path, "image", "must be a non-empty string")
    command = data.get("command")
    if command is not None:
        command = _str_list(manifest_path, "command", command)
        if not command:
            raise _fail(manifest_path, "command", "must not be empty")
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise _fail(manifest_path, "env", "must be a mapping of strings to strings")
    for key in env:
        if not is_env_name(key) or key in RESERVED_ENV:
            raise _fail(manifest_path, f"env.{key}", "is not an allowed variable name")
    config_mount = data.get("config_mount")
    if config_mount is not None and (
        not isinstance(config_mount, str) or not config_mount.startswith("/")
    ):
        raise _fail(manifest_path, "config_mount", "must be an absolute path")
    restart = data.get("restart", "on-failure")
    if restart not in RESTART_POLICIES:
        raise _fail(manifest_path, "restart", f"must be one of: {', '.join(RESTART_POLICIES)}")
    sandbox = data.get("sandbox", SANDBOXES[0])
    if sandbox not in SANDBOXES:
        raise _fail(manifest_path, "sandbox", f"must be one of: {', '.join(SANDBOXES)}")
    members = data.get("members")
    members = () if members is None else _str_list(manifest_path, "members", members, NAME_RE)

    runtime_config = data.get("runtime_config") or {}
    if not isinstance(runtime_config, dict):
        raise _fail(manifest_path, "runtime_config", "must be a mapping")
    unknown = sorted(set(runtime_config) - _KNOWN_RUNTIME_KEYS)
    if unknown:
        raise _fail(manifest_path, f"runtime_config.{unknown[0]}", "unknown key")
    timeout = runtime_config.get("provision_timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        raise _fail(
            manifest_path,
            "runtime_config.provision_timeout_seconds",
            "must be a positive integer (seconds)",
        )
    idle = runtime_config.get("idle_timeout_seconds")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int) or idle < 0):
        raise _fail(
            manifest_path,
            "runtime_config.idle_timeout_seconds",
            "must be a non-negative integer (seconds; 0 = never stop for idling)",
        )
    required = runtime_config.get("required_env")
    required = (
        ()
        if required is None
        else _str_list(manifest_path, "runtime_config.required_env", required, ENV_NAME_RE)
    )
    resources = _resources(manifest_path, data.get("resources"))
    pool_size = _pool(manifest_path, data.get("pool"))
    if pool_size and (command is not None or members):
        raise _fail(
            manifest_path,
            "pool",
            "needs the platform's agent: a template with a command or members cannot pool",
        )
    return Template(
        pool_size=pool_size,
        fingerprint=_fingerprint(manifest_path, image),
        placement=_placement(manifest_path, data.get("placement")),
        app=_app(manifest_path, data.get("app")),
        name=name,
        path=manifest_path.parent,
        resources=resources,
        runtime=runtime,
        image=image,
        command=command,
        env=dict(env),
        config_mount=config_mount,
        members=members,
        provision_timeout_seconds=timeout,
        required_env=required,
        idle_timeout_seconds=idle,
        restart=restart,
        sandbox=sandbox,
    )


def _pool(path: Path, value: Any) -> int:
    if value is None:
        return 0
    if not isinstance(value, dict):
        raise _fail(path, "pool", "must be a mapping: {size: N}")
    unknown = sorted(set(value) - _KNOWN_POOL_KEYS)
    if unknown:
        raise _fail(path, f"pool.{unknown[0]}", "unknown key")
    size = value.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_POOL_SIZE:
        raise _fail(path, "pool.size", f"must be an integer from 0 to {MAX_POOL_SIZE}")
    return size


def _fingerprint(manifest_path: Path, image: str | None) -> str:
    """What a pool member was made from: the manifest, every file of the folder, the image."""
    digest = hashlib.sha256()
    digest.update((image or settings.DOCKER_AGENT_IMAGE).encode())
    for path in sorted(manifest_path.parent.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(path.relative_to(manifest_path.parent).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def _app(path: Path, value: Any) -> AppSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path, "app", "must be a mapping with port, health_path and command")
    unknown = sorted(set(value) - _KNOWN_APP_KEYS)
    if unknown:
        raise _fail(path, f"app.{unknown[0]}", "unknown key")
    port = value.get("port", "auto")
    if port == "auto":
        port = None
    elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _fail(path, "app.port", "must be 'auto' or a port number (1-65535)")
    health_path = value.get("health_path", "/")
    if not isinstance(health_path, str) or not health_path.startswith("/"):
        raise _fail(path, "app.health_path", "must be a path starting with '/'")
    command = value.get("command")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise _fail(path, "app.command", "must be a non-empty shell command string")
    return AppSpec(port=port, health_path=health_path, command=command)


@dataclass(frozen=True)
class TemplateSet:
    directory: Path
    templates: Mapping[str, Template]
    errors: tuple[ManifestError, ...]

    def get(self, name: str) -> Template | None:
        return self.templates.get(name)

    def errors_for(self, name: str) -> tuple[ManifestError, ...]:
        """The errors of template ``name``'s own manifest (a broken template is left out)."""
        return tuple(
            error
            for error in self.errors
            if Path(error.path).name == MANIFEST_NAME and Path(error.path).parent.name == name
        )

    def runtime_default(self, runtime: str) -> Template | None:
        """The recovery source of a runtime: the template named ``<runtime>-default``."""
        return self.templates.get(f"{runtime}-default")

    def for_launch(self, name: str, runtime: str) -> Template | None:
        """The template a cycle launches (and recovers a config from): the workspace's own, or
        ``<runtime>-default`` when that is gone; None when neither exists."""
        return self.get(name) or self.runtime_default(runtime)


def load_templates(directory: Path) -> TemplateSet:
    templates: dict[str, Template] = {}
    errors: list[ManifestError] = []
    if not directory.is_dir():
        errors.append(ManifestError(str(directory), "WORKSPACE_TEMPLATES_DIR", "is not a folder"))
        return TemplateSet(directory, templates, tuple(errors))
    for manifest_path in sorted(directory.glob(f"*/{MANIFEST_NAME}")):
        try:
            template = parse_manifest(manifest_path.parent.name, manifest_path)
        except InvalidManifest as exc:
            errors.append(exc.error)
            continue
        templates[template.name] = template
    for template in list(templates.values()):
        for member in template.members:
            member_template = templates.get(member)
            if member_template is None or member_template.is_team:
                errors.append(
                    ManifestError(
                        str(template.path / MANIFEST_NAME),
                        "members",
                        f"{member!r} is not a known non-team template",
                    )
                )
                templates.pop(template.name, None)
                break
    return TemplateSet(directory, templates, tuple(errors))


def _signature(directory: Path) -> tuple:
    try:
        entries = []
        # Every file, not only the manifests: a template's fingerprint covers its files, so a
        # changed file must reach the warm pools (their members are made from the files).
        for path in sorted(directory.glob("*/**/*")):
            stat = path.stat()
            entries.append((str(path), stat.st_mtime_ns, stat.st_size))
        return (directory.stat().st_mtime_ns, tuple(entries))
    except OSError:
        return ()


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set: TemplateSet | None = None
        self._signature: tuple = ()
        self._checked_at = 0.0

    def get(self) -> TemplateSet:
        directory = Path(settings.WORKSPACE_TEMPLATES_DIR)
        now = time.monotonic()
        current = self._set
        if (
            current is not None
            and current.directory == directory
            and now - self._checked_at < RELOAD_CHECK_SECONDS
        ):
            return current
        with self._lock:
            signature = _signature(directory)
            if (
                self._set is None
                or self._set.directory != directory
                or signature != self._signature
            ):
                self._set = load_templates(directory)
                self._signature = signature
            self._checked_at = now
            return self._set

    def invalidate(self) -> None:
        with self._lock:
            self._set = None
            self._signature = ()


_registry = _Registry()


def templates() -> TemplateSet:
    """The current, validated template set (cached, reloaded when its files change)."""
    return _registry.get()


def invalidate_templates() -> None:
    _registry.invalidate()


def pool_size(template: Template) -> int:
    """How many members ``template``'s warm pool keeps, the one accessor: WORKSPACE_POOL_SIZES >
    the manifest's ``pool.size`` > 0. A template whose command replaces the agent, or a team, has
    no pool (nothing would wait for a claim)."""
    if template.command or template.is_team:
        return 0
    override: Mapping[str, int] = settings.WORKSPACE_POOL_SIZES
    return int(override.get(template.name, template.pool_size))


def pooled_templates() -> list[Template]:
    """Every template with a pool of at least one member."""
    return [t for t in templates().templates.values() if pool_size(t) > 0]
