"""Shared by every writer: the errors callers show, input validation, events, and
``transition``, the only status write."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from celery import current_app
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from workspaces import audit, event_channel
from workspaces.models import Workspace, WorkspaceEvent
from workspaces.naming import RESERVED_ENV, is_env_name
from workspaces.status import (
    EventSource,
    EventType,
    WorkspaceStatus,
    allowed_sources,
)

logger = logging.getLogger(__name__)

# The engine's task that converges a workspace, enqueued by its name: the domain does not import
# the engine (provisioning.tasks registers the task under this name).
CONVERGE_TASK = "provisioning.converge"

# The OpenAPI schema publishes this pattern, so it keeps ECMA's "$" (end of input there); Python
# applies it with fullmatch only, since its "$" also matches before a final newline.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_ENV_VARS = 200
MAX_ENV_VALUE_BYTES = 32 * 1024
# All names and values together. It keeps every valid env inside a request body of
# API_MAX_BODY_BYTES (even at JSON's worst escaping, 6 bytes per byte) and far inside what Linux
# lets a process start with (execve: ARG_MAX, 2 MiB with the usual stack limit).
MAX_ENV_TOTAL_BYTES = 256 * 1024

# Variables a user may not set (the README's "Workspace env" section lists them with the reason).
# The platform's own: the agent reads WORKSPACE_* and AGENT_* (its health command among them), so
# only the template manifest, which operators own, may set those. Loader, shell and interpreter
# variables: each makes a program run code it was not asked to run (LD_PRELOAD, BASH_ENV,
# PYTHONSTARTUP, NODE_OPTIONS, ...) or find other programs than the ones meant (PATH).
DENIED_ENV_PREFIXES = (
    "WORKSPACE_",
    "AGENT_",
    "LD_",
    "DYLD_",
    "PYTHON",
    "BASH_FUNC_",
    "MALLOC_",
    "GLIBC_",
)
DENIED_ENV_NAMES = frozenset(
    {
        "PLATFORM_URL",
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "ENV",
        "BASH_ENV",
        "IFS",
        "CDPATH",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "GLOBIGNORE",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RESOLV_HOST_CONF",
        "PERL5OPT",
        "PERL5LIB",
        "PERLLIB",
        "RUBYOPT",
        "RUBYLIB",
        "NODE_OPTIONS",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
    }
)


def env_name_denied(key: str) -> bool:
    """Whether ``key`` is a platform, loader or interpreter variable a user may not set."""
    upper = key.upper()
    return upper in DENIED_ENV_NAMES or upper.startswith(DENIED_ENV_PREFIXES)


class ServiceError(Exception):
    """Base of the errors a caller can show to a person."""


class InvalidInput(ServiceError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TransitionNotAllowed(ServiceError):
    """The workspace's current status forbids the request (HTTP 409)."""


class AgentAuthError(ServiceError):
    """The agent's bearer token is unknown, for another workspace, or of an older cycle."""


class LimitExceeded(ServiceError):
    """A quota or the provisioning concurrency cap refuses the request (HTTP 429); nothing was
    written. ``retry_after`` is the number of seconds after which asking again makes sense."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(ServiceError):
    """A fenced write matched no row: a newer cycle owns the workspace now."""


class IntentChanged(ServiceError):
    """A request committed between the lifecycle's plan and the cycle's row lock asked for
    something else: nothing was written, and the lifecycle plans again from the locked truth."""


# --- validation shared by the API, the admin and manage.py ---------------------------------------
def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            "name",
            "must be 1-63 characters of lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    return name


def validate_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidInput("env", "must be an object mapping variable names to string values")
    if len(env) > MAX_ENV_VARS:
        raise InvalidInput("env", f"must have at most {MAX_ENV_VARS} variables")
    for key, value in env.items():
        if not is_env_name(key):
            raise InvalidInput("env", f"{key!r} is not a valid variable name")
        if key in RESERVED_ENV or env_name_denied(key):
            raise InvalidInput(
                "env",
                f"{key} is reserved (platform, loader and interpreter variables cannot be set; "
                'see the README\'s "Workspace env" section)',
            )
        if not isinstance(value, str):
            raise InvalidInput("env", f"the value of {key} must be a string")
        if "\x00" in value:
            raise InvalidInput("env", f"the value of {key} contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(
                "env", f"the value of {key} is not valid Unicode (a lone surrogate)"
            ) from None
        if len(value.encode()) > MAX_ENV_VALUE_BYTES:
            raise InvalidInput(
                "env", f"the value of {key} is longer than {MAX_ENV_VALUE_BYTES} bytes"
            )
    return dict(env)


def check_env_size(env: Mapping[str, str]) -> None:
    """The total size limit of an env that ``validate_env`` accepted."""
    total = sum(len(key.encode()) + len(value.encode()) for key, value in env.items())
    if total > MAX_ENV_TOTAL_BYTES:
        raise InvalidInput(
            "env",
            f"names and values together are {total} bytes; the limit is {MAX_ENV_TOTAL_BYTES}",
        )


def _enqueue_converge(workspace_id: UUID) -> None:
    # After commit: a worker must never pick up a task whose row it cannot see yet. This is
    # Celery's delay_on_commit made robust: the committed row (requested_seq > handled_seq) is
    # the outbox, so a broker that is down when the request commits loses nothing (the redrive
    # sweep enqueues the intent once the broker is back) and must not turn the committed request
    # into a 500.
    transaction.on_commit(functools.partial(send_converge, workspace_id))


def send_converge(workspace_id: UUID) -> bool:
    """Publish a converge task now; False (logged) when the broker cannot take it."""
    try:
        current_app.send_task(CONVERGE_TASK, (str(workspace_id),))
    except (BrokerError, RedisError, OSError) as exc:
        logger.warning(
            "could not enqueue workspace %s (%s); the redrive sweep will", workspace_id, exc
        )
        return False
    return True


def record_event(
    workspace_id: UUID,
    type: EventType,
    source: EventSource,
    generation: int,
    payload: dict[str, Any] | None = None,
    *,
    actor: str | None = None,
    workspace: Workspace | None = None,
) -> WorkspaceEvent:
    """Record an event. ``actor`` defaults to who the source implies (agent, beat, reconciler)
    or else to the workspace's latest requester (``requested_by``): a cycle's events name the
    person or process whose request the cycle answers. ``workspace``: the caller's current row
    of that workspace (with its owner), saving the read of its name, owner and requester."""
    row: tuple[str, str, int, str] | None
    if workspace is not None and Workspace.owner.is_cached(workspace):
        # The caller's row (locked in this transaction) already says who and what.
        row = (
            workspace.name,
            workspace.owner.username,
            workspace.owner_id,
            workspace.requested_by,
        )
    else:
        row = (
            Workspace.objects.filter(id=workspace_id)
            .values_list("name", "owner__username", "owner_id", "requested_by")
            .first()
        )
    name, owner, owner_id, requested_by = row or ("?", "?", None, "")
    if actor is None:
        actor = audit.SOURCE_ACTORS.get(source) or requested_by or audit.SYSTEM
    event = WorkspaceEvent.objects.create(
        workspace_id=workspace_id,
        type=type,
        source=source,
        generation=generation,
        payload=payload or {},
        actor=actor,
    )
    logger.info(
        "workspace %s/%s (%s) event %s source=%s actor=%s generation=%s",
        owner,
        name,
        workspace_id,
        type.value,
        source.value,
        actor,
        generation,
    )
    # Live subscribers hear of the event only once it is committed: a stream must never show an
    # event that a rollback then takes back, and a client that resumes from its id must find it.
    if owner_id is not None:
        transaction.on_commit(
            functools.partial(event_channel.publish, event, owner_id), robust=True
        )
    return event


def transition(
    workspace_id: UUID,
    to: WorkspaceStatus,
    *,
    expect_generation: int | None = None,
    expect_status: WorkspaceStatus | None = None,
    when: Q | None = None,
    **fields: Any,
) -> bool:
    """Move the workspace to ``to`` if its status allows it and, when given, only if its
    generation is still ``expect_generation``, its status is exactly ``expect_status`` and the
    row matches ``when`` (e.g. the heartbeat or the start time a sweep saw). Returns whether the
    row changed."""
    sources = allowed_sources(to)
    if expect_status is not None:
        if expect_status not in sources:
            raise ValueError(f"{expect_status} -> {to} is not in the transition table")
        sources = frozenset({expect_status})
    now = timezone.now()
    rows = Workspace.objects.filter(id=workspace_id, status__in=sources)
    if expect_generation is not None:
        rows = rows.filter(generation=expect_generation)
    if when is not None:
        rows = rows.filter(when)
    # The time-in-state clock restarts only when the status really changes (a cycle may move
    # provisioning -> provisioning).
    changed_at = Case(When(status=to, then=F("status_changed_at")), default=Value(now))
    return rows.update(status=to, updated_at=now, status_changed_at=changed_at, **fields) == 1


def _locked(workspace_id: UUID) -> Workspace:
    """The row, locked until the transaction ends, with its owner (read, not locked: another
    transaction may lock the owner meanwhile, e.g. the quota check)."""
    try:
        return (
            Workspace.objects.select_for_update(of=("self",))
            .select_related("owner")
            .get(id=workspace_id)
        )
    except Workspace.DoesNotExist:
        raise Workspace.DoesNotExist(f"no workspace {workspace_id}") from None


def _fenced(workspace_id: UUID, generation: int) -> Any:
    return Workspace.objects.filter(id=workspace_id, generation=generation)
