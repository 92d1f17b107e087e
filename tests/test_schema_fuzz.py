"""Schemathesis over /api/schema/ against the server bin/run starts (a stack of the test's own,
whose streams end after a second, tests/stack.py): no request it generates, valid or
not, may get a 5xx, and every response must match the schema (status code, content type,
headers, body). Bounded to a few minutes (FUZZ_MAX_TIME, FUZZ_MAX_EXAMPLES and FUZZ_SEED widen
a run by hand); hooks in tests/schemathesis_hooks.py make a share of
the bodies valid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.provisioning.test_reconciler import make_row
from tests.stack import Stack
from workspaces import services
from workspaces.status import WorkspaceStatus

S = WorkspaceStatus
REPO = Path(__file__).resolve().parent.parent
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.django_db(transaction=True)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    user, make_user, session_templates, tmp_path
) -> None:
    # Streams end after a second so a generated stream request does not hold the run.
    quick = {
        "EVENTS_STREAM_MAX_SECONDS": "1",
        "EVENTS_STREAM_KEEPALIVE_SECONDS": "1",
        "LOGS_STREAM_MAX_SECONDS": "1",
    }
    token = services.issue_api_token(user)
    # Rows on the stack's backend, with no instance behind them: their logs are empty.
    statuses = (S.ONLINE, S.STOPPED, S.FAILED, S.REMOVED)
    rows = [make_row(user, status, backend="process") for status in statuses]
    rows.append(make_row(make_user("someone-else"), S.ONLINE, backend="process"))  # 404
    agent_row = make_row(user, S.PROVISIONING, is_running=True, backend="process")
    agent_token = services.issue_agent_token(agent_row.id, agent_row.generation)
    env: dict[str, Any] = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        "PYTHONPATH": str(REPO),
        "FUZZ_WORKSPACE_IDS": ",".join(str(row.id) for row in [*rows, agent_row]),
        "FUZZ_AGENT_WORKSPACE_ID": str(agent_row.id),
        "FUZZ_AGENT_TOKEN": agent_token,
        "FUZZ_USER_TOKEN": token,
    }
    stack = Stack(session_templates, env=quick, slot=1).start()
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{stack.url}/api/schema/",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        os.environ.get("FUZZ_MAX_EXAMPLES", "40"),
        "--seed",
        os.environ.get("FUZZ_SEED", "11"),
        # One worker: Hypothesis parses lambda sources with ast, which CPython 3.11 does not
        # make thread-safe ("AST constructor recursion depth mismatch" with two workers).
        "--workers",
        "1",
        "--max-time",
        os.environ.get("FUZZ_MAX_TIME", "120"),
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    try:
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False
        )
    finally:
        stack.stop_workspaces()
        stack.stop()
        stack.cleanup()
    output = result.stdout + result.stderr
    print(output[-6_000:])  # the run's summary, shown with -s or on failure
    assert result.returncode == 0, output[-20_000:]
    assert "API Operations" in output or "passed" in output, output[-5_000:]
