"""Where workspaces run and from what: the backend, templates, the process backend's isolation,
provisioning timeouts and their sweeper, idle auto-stop, the restart policy."""

from __future__ import annotations

from pathlib import Path

from project.env import (
    env_choice,
    env_float,
    env_int,
    env_int_map,
    env_int_range,
    env_list,
    env_optional_int,
    env_str,
    env_url,
    section,
)
from project.settings.web import BASE_DIR

WORKSPACE_BACKENDS = ("docker", "process", "swarm")

section("workspaces")
WORKSPACE_BACKEND = env_choice(
    "WORKSPACE_BACKEND",
    "process",
    WORKSPACE_BACKENDS,
    doc=("Where new workspaces run: local processes, Docker containers, or Swarm services."),
)
# Backends registered by dotted path, name -> factory. Never read from the environment: only the
# test settings register one (a scripted backend that runs inside real worker processes).
EXTRA_BACKEND_FACTORIES: dict[str, str] = {}
WORKSPACE_TEMPLATES_DIR = Path(
    env_str(
        "WORKSPACE_TEMPLATES_DIR",
        str(BASE_DIR / "workspace_templates"),
        doc="Template manifests, one folder each.",
        shown="./workspace_templates",
    )
).resolve()
WORKSPACE_DEFAULT_TEMPLATE = env_str(
    "WORKSPACE_DEFAULT_TEMPLATE",
    "shell-default",
    doc=(
        "The template `manage.py workspace create` uses without `--template`, and the "
        "one the dashboard's create form shows first."
    ),
)
PLATFORM_URL = env_url(
    "PLATFORM_URL",
    "http://127.0.0.1:8001",
    doc=(
        "What agents call back: the registry listener, which serves `/api/registry/*` "
        "alone. On the Docker backend its host part is replaced by each workspace "
        "network's gateway address."
    ),
)
WORKSPACE_DATA_DIR = Path(
    env_str(
        "WORKSPACE_DATA_DIR",
        str(BASE_DIR / "var" / "workspaces"),
        doc="The process backend's per-workspace folders (config, home, pid file, output).",
        shown="./var/workspaces",
    )
)
STOP_GRACE_SECONDS = env_int(
    "STOP_GRACE_SECONDS",
    10,
    minimum=0,
    doc="A stop sends SIGTERM, then SIGKILL after this long.",
)

section("isolation")
# Process backend: "uid" runs each workspace as its own unprivileged uid/gid from
# WORKSPACE_UID_RANGE behind a firewall; "none" runs workspaces as the platform's own user, for
# single-user development only (then only one owner may have workspaces on this backend).
WORKSPACE_PROCESS_ISOLATION = env_choice(
    "WORKSPACE_PROCESS_ISOLATION",
    "uid",
    ("uid", "none"),
    doc=(
        "`uid`: a uid per workspace (needs root); `none`: unisolated, single-user development only."
    ),
)
WORKSPACE_UID_RANGE = env_int_range(
    "WORKSPACE_UID_RANGE",
    (200000, 200999),
    minimum=1000,
    doc=("Uids (and gids) handed to process-backend workspaces; at most that many live at once."),
)
# The Python that runs the platform's agent (and `{python}` in a manifest's command) on the
# process backend. Workspace uids must be able to run it: the platform's own virtualenv may sit
# in a folder they cannot enter. The agent needs only the standard library.
WORKSPACE_PYTHON = env_str(
    "WORKSPACE_PYTHON",
    "/usr/bin/python3",
    doc=(
        "The interpreter of the process backend's agent (copied under "
        "`WORKSPACE_DATA_DIR/.agent/`, so workspace uids never read the checkout; every"
        " folder above `WORKSPACE_DATA_DIR` must be enterable by them, `o+x`, or the "
        "backend refuses to start saying so)."
    ),
)
# Without isolation the platform's own interpreter is used.
WORKSPACE_APPS_PYTHON = env_str(
    "WORKSPACE_APPS_PYTHON",
    "/opt/workspace-apps/bin/python",
    doc=(
        "`{python}` in a template's app command under uid isolation: a virtualenv of "
        "the system Python with the `apps` group (JupyterLab), made by `bin/apps-venv`."
    ),
)
WORKSPACE_FIREWALL_CHAIN = env_str(
    "WORKSPACE_FIREWALL_CHAIN",
    "WS-ISOLATION",
    doc=(
        "The nftables table (`inet`) the process backend owns, and the prefix of the "
        "Docker bridges' iptables chain (`<name>-BRIDGE`)."
    ),
)
WORKSPACE_REGISTRY_PORT = env_optional_int(
    "WORKSPACE_REGISTRY_PORT",
    minimum=1,
    doc=(
        "The one host port workspaces may connect to from their links; unset: the port "
        "of `PLATFORM_URL`. Every platform process of the host must agree."
    ),
)
WORKSPACE_HIDDEN_PATHS = env_list(
    "WORKSPACE_HIDDEN_PATHS",
    [
        "/var/run/postgresql",
        "/run/postgresql",
        "/var/run/redis",
        "/run/redis",
        "/var/run/docker.sock",
        "/run/docker.sock",
    ],
    doc=(
        "Paths hidden from process workspaces (an empty tmpfs or /dev/null in their mount "
        "namespace) when outside `WORKSPACE_PRIVATE_PATHS`."
    ),
    shown="(PostgreSQL's, Redis's and Docker's socket paths under /run and /var/run)",
)

# What a process workspace's mount namespace gives it of its own: each folder an empty tmpfs, so the
# host's sockets, shared memory and temporary files in them are absent without anyone naming them
# (the workspace's own folder under WORKSPACE_DATA_DIR is bound back in when it lies below one).
WORKSPACE_PRIVATE_PATHS = env_list(
    "WORKSPACE_PRIVATE_PATHS",
    ["/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm"],
    doc=(
        "Folders a process workspace gets as empty ones of its own (tmpfs in its mount "
        "namespace): the host's sockets and files in them are absent."
    ),
)

section("timeouts")
# Provisioning timeouts: PROVISION_TIMEOUT_SECONDS > manifest > per-runtime default > 600 s.
PROVISION_TIMEOUT_SECONDS = env_optional_int(
    "PROVISION_TIMEOUT_SECONDS",
    minimum=1,
    doc="Global override of every provisioning timeout.",
)
RUNTIME_PROVISION_TIMEOUTS = env_int_map(
    "RUNTIME_PROVISION_TIMEOUTS",
    {"hermes": 1800, "claude-code": 900},
    doc=("Per-runtime provisioning timeouts, used when a manifest gives none (then 600 s)."),
)
DEFAULT_PROVISION_TIMEOUT_SECONDS = 600

# --- Stuck-provisioning sweeper (provisioning/sweeper.py) ---------------------------------------
# Beat runs it every SWEEP_PROVISIONING_INTERVAL_SECONDS (tasks.py); `manage.py sweep_provisioning`
# runs it once. In-flight rows are read in batches of this size (keyset over the partial index).
SWEEP_PROVISIONING_BATCH_SIZE = env_int(
    "SWEEP_PROVISIONING_BATCH_SIZE",
    500,
    minimum=1,
    doc="In-flight rows the sweep reads per query.",
)
# A row whose flip raised is skipped by later sweeps for this long (a poison row is pushed
# forward instead of failing every sweep).
SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS = env_int(
    "SWEEP_PROVISIONING_POISON_BACKOFF_SECONDS",
    300,
    minimum=1,
    doc="How long a row that made the sweep fail is left alone.",
)

section("pools")
# Warm pools (docs/operating.md "Warm pools"): per template, instances kept running and waiting so
# that a create claims one instead of starting cold. The manifest's `pool: {size: N}` says how
# many; this overrides it per template (0 switches a template's pool off).
WORKSPACE_POOL_SIZES = env_int_map(
    "WORKSPACE_POOL_SIZES",
    {},
    minimum=0,
    unit="size",
    doc=(
        "Per-template warm pool sizes (`shell-default=5,jupyterlab=0`), overriding the "
        "manifests' `pool.size`; `0` switches a pool off."
    ),
)
POOL_SWEEP_INTERVAL_SECONDS = env_int(
    "POOL_SWEEP_INTERVAL_SECONDS",
    15,
    minimum=1,
    doc=(
        "How often beat runs the pool sweep (refill, retire changed or failed members); a "
        "claim also asks for a refill at once."
    ),
)
# A claim's refill waits this long after the template's latest claim, then until the burst's
# hand-over cycles have begun (provisioning.pools.claim_quiet_for): a burst of creates is served
# by the pool first, and its members' replacements start once it is over (started during it,
# they take the CPU its hand-overs need).
POOL_REFILL_DELAY_SECONDS = env_float(
    "POOL_REFILL_DELAY_SECONDS",
    1.0,
    doc=(
        "A pool is refilled this long after its latest claim (claims within it push the "
        "refill on), and once every claim's hand-over has begun, so replacements never "
        "compete with a burst's hand-overs."
    ),
)
WORKSPACE_POOL_OWNER = env_str(
    "WORKSPACE_POOL_OWNER",
    "_pool",
    doc=(
        "The username that owns unclaimed pool members (made inactive, without a password); "
        "no person may use it."
    ),
)

section("idle")
IDLE_TIMEOUT_SECONDS = env_int(
    "IDLE_TIMEOUT_SECONDS",
    0,
    minimum=0,
    doc=(
        "Idle timeout of templates whose manifest has no "
        "`runtime_config.idle_timeout_seconds`; `0`: never."
    ),
)
IDLE_SWEEP_INTERVAL_SECONDS = env_int(
    "IDLE_SWEEP_INTERVAL_SECONDS",
    60,
    minimum=1,
    doc="How often beat runs the idle sweep.",
)
IDLE_SWEEP_BATCH_SIZE = env_int(
    "IDLE_SWEEP_BATCH_SIZE",
    500,
    minimum=1,
    doc="Rows read per batch by the idle sweep.",
)
# services.record_activity (the proxy's per-request signal) writes a workspace's row at most once
# per this many seconds. An idle timeout shorter than this counts as this long, so an activity
# skipped by the rate limit can never be the one whose absence stops a workspace.
ACTIVITY_WRITE_INTERVAL_SECONDS = env_int(
    "ACTIVITY_WRITE_INTERVAL_SECONDS",
    30,
    minimum=1,
    doc=(
        "`record_activity` writes a workspace's row at most this often; shorter idle "
        "timeouts count as this long."
    ),
)

section("restart")
# The manifest's `restart: on-failure | never`: a workspace whose instance dies while wanted
# running is restarted after
# min(RESTART_BACKOFF_BASE_SECONDS * 2 ** (deaths in the window - 1), RESTART_BACKOFF_MAX_SECONDS);
# the RESTART_MAX_FAILURES-th death within RESTART_FAILURE_WINDOW_SECONDS makes it `failed`.
RESTART_BACKOFF_BASE_SECONDS = env_int(
    "RESTART_BACKOFF_BASE_SECONDS",
    5,
    minimum=1,
    doc="The first restart's delay; doubles with each death in the window.",
)
RESTART_BACKOFF_MAX_SECONDS = env_int(
    "RESTART_BACKOFF_MAX_SECONDS", 300, minimum=1, doc="The longest delay."
)
RESTART_MAX_FAILURES = env_int(
    "RESTART_MAX_FAILURES",
    5,
    minimum=1,
    doc="Deaths within the window after which the workspace is `failed`.",
)
RESTART_FAILURE_WINDOW_SECONDS = env_int(
    "RESTART_FAILURE_WINDOW_SECONDS", 900, minimum=1, doc="The window."
)
DEATH_OUTPUT_LINES = env_int(
    "DEATH_OUTPUT_LINES",
    20,
    minimum=0,
    doc="Lines of output a death event and `last_error` carry.",
)
