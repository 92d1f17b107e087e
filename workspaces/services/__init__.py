"""Every write to a workspace, and every status change, goes through this module.

Two kinds of writes:

* **Requests** (API, admin, ``manage.py workspace``): record the intent (``desired_state`` and
  ``requested_seq``) in one transaction and enqueue a converge task with ``delay_on_commit``.
  They never touch the backend and never wait for the gate.
* **Cycle writes** (the lifecycle, under the gate): fenced by ``generation``. A cycle bumps the
  generation when it begins; every later write of that cycle is ``UPDATE ... WHERE id = %s AND
  generation = %s``, so a holder whose lease expired and was overtaken changes nothing.

Status changes go through ``transition``, which turns the transition table into the ``WHERE
status IN (...)`` of the same UPDATE: the check happens at the moment of the write.

The package is split by caller, with the same single-writer rule: ``requests`` (API, admin,
``manage.py``), ``cycles`` (the lifecycle under the gate), ``agents`` (registration and heartbeats),
``repairs`` (reconciler and liveness), ``activity`` (activity signals and the idle stop),
``credentials`` (API tokens, env key rotation),
``common`` (errors, validation, events, ``transition``),
``limits`` (the quota and the provisioning cap, checked inside a request's transaction),
``claims`` and ``pools`` (warm pools: the claim inside a create, the members' refill and
retirement; ``services.pools.<name>``).
Callers use ``from workspaces import services`` and ``services.<name>``.
"""

# The digest agent tokens are stored by (one for every token: workspaces.crypto.token_digest).
from workspaces.crypto import token_digest as hash_token
from workspaces.services.activity import IDLE_POLICY, record_activity, request_idle_stop
from workspaces.services.agents import (
    HeartbeatAnswer,
    _agent_workspace,
    authenticate_agent,
    beat,
    record_heartbeat,
    register_agent,
)
from workspaces.services.claims import REFILL_TASK, claim_member
from workspaces.services.common import (
    CONVERGE_TASK,
    MAX_ENV_TOTAL_BYTES,
    MAX_ENV_VALUE_BYTES,
    MAX_ENV_VARS,
    NAME_RE,
    AgentAuthError,
    IntentChanged,
    InvalidInput,
    LeaseLost,
    LimitExceeded,
    ServiceError,
    TransitionNotAllowed,
    _enqueue_converge,
    _locked,
    check_env_size,
    record_event,
    send_converge,
    transition,
    validate_env,
    validate_name,
)
from workspaces.services.credentials import (
    RotationReport,
    issue_api_token,
    revoke_api_tokens,
    rotate_env_encryption,
)
from workspaces.services.cycles import (
    CycleStart,
    _fenced,
    begin_cycle,
    begin_reap,
    complete_remove,
    complete_stop,
    fail_cycle,
    fail_stuck_provisioning,
    issue_agent_token,
    record_backend_facts,
    record_config_recovered,
    record_error,
)
from workspaces.services.isolation import (
    IsolationRefused,
    ensure_isolation_uid,
    uid_isolation_applies,
)
from workspaces.services.limits import check_concurrency, check_quota
from workspaces.services.repairs import (
    RESTART_DUE_TASK,
    mark_missed_heartbeats,
    record_instance_found_running,
    record_instance_gone,
    record_orphan_removed,
    record_unwanted_instance_stopped,
    restart_backoff_seconds,
    restart_due,
)
from workspaces.services.requests import (
    LIFECYCLE_REQUESTS,
    UPDATABLE_FIELDS,
    Team,
    _insert_workspace,
    _template_for,
    create_team,
    create_workspace,
    request_remove,
    request_restart,
    request_start,
    request_stop,
    team_member_names,
    update_workspace,
)

__all__ = [
    "CONVERGE_TASK",
    "IDLE_POLICY",
    "LIFECYCLE_REQUESTS",
    "MAX_ENV_TOTAL_BYTES",
    "MAX_ENV_VALUE_BYTES",
    "MAX_ENV_VARS",
    "NAME_RE",
    "REFILL_TASK",
    "RESTART_DUE_TASK",
    "UPDATABLE_FIELDS",
    "AgentAuthError",
    "CycleStart",
    "HeartbeatAnswer",
    "IntentChanged",
    "InvalidInput",
    "IsolationRefused",
    "LeaseLost",
    "LimitExceeded",
    "RotationReport",
    "ServiceError",
    "Team",
    "TransitionNotAllowed",
    "_agent_workspace",
    "_enqueue_converge",
    "_fenced",
    "_insert_workspace",
    "_locked",
    "_template_for",
    "authenticate_agent",
    "beat",
    "begin_cycle",
    "begin_reap",
    "check_concurrency",
    "check_env_size",
    "check_quota",
    "claim_member",
    "complete_remove",
    "complete_stop",
    "create_team",
    "create_workspace",
    "ensure_isolation_uid",
    "fail_cycle",
    "fail_stuck_provisioning",
    "hash_token",
    "issue_agent_token",
    "issue_api_token",
    "mark_missed_heartbeats",
    "record_activity",
    "record_backend_facts",
    "record_config_recovered",
    "record_error",
    "record_event",
    "record_heartbeat",
    "record_instance_found_running",
    "record_instance_gone",
    "record_orphan_removed",
    "record_unwanted_instance_stopped",
    "register_agent",
    "request_idle_stop",
    "request_remove",
    "request_restart",
    "request_start",
    "request_stop",
    "restart_backoff_seconds",
    "restart_due",
    "revoke_api_tokens",
    "rotate_env_encryption",
    "send_converge",
    "team_member_names",
    "transition",
    "uid_isolation_applies",
    "update_workspace",
    "validate_env",
    "validate_name",
]
