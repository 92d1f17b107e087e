"""Schemathesis hooks for tests/test_schema_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Random bodies would almost never name a real template or workspace, so most requests would stop
at the first 400 or 404. These hooks steer four cases in five to valid input: the user's token
(the agent's Bearer token on the registry), a known template, a valid env, an existing workspace
id. The fifth stays as generated, so invalid input and missing credentials are exercised too.
The fixture data comes from FUZZ_* environment variables set by the test."""

from __future__ import annotations

import itertools
import os
from typing import Any

import schemathesis

WORKSPACE_IDS = [value for value in os.environ.get("FUZZ_WORKSPACE_IDS", "").split(",") if value]
AGENT_WORKSPACE_ID = os.environ.get("FUZZ_AGENT_WORKSPACE_ID", "")
AGENT_TOKEN = os.environ.get("FUZZ_AGENT_TOKEN", "")
USER_TOKEN = os.environ.get("FUZZ_USER_TOKEN", "")
_counter = itertools.count()


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    turn = next(_counter)
    if turn % 5 == 0:
        return case  # as generated
    path, method = case.operation.path, case.method.upper()
    registry = path.startswith("/api/registry/")
    credentials = f"Bearer {AGENT_TOKEN}" if registry else f"Token {USER_TOKEN}"
    case.headers = {**(case.headers or {}), "Authorization": credentials}
    if "{id}" in path and WORKSPACE_IDS:
        case.path_parameters = {
            **(case.path_parameters or {}),
            "id": WORKSPACE_IDS[turn % len(WORKSPACE_IDS)],
        }
    body = case.body if isinstance(case.body, dict) else None
    if body is None or method != "POST":
        return case
    if path == "/api/workspaces/":
        body["template"] = "shell-default"
        body["env"] = {"GIT_AUTHOR_NAME": f"fuzz {turn}"}
    elif path == "/api/teams/":
        body["template"] = "team-default"
        # Member names are "<team>-<member>": leave room for the longest member template name.
        if isinstance(body.get("name"), str):
            body["name"] = body["name"][:20].rstrip("-") or "team"
        body.pop("env", None)
    elif registry:
        body["workspace_id"] = AGENT_WORKSPACE_ID
    return case
