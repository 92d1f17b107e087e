"""Secrets at rest, the test of record: a database populated through the real web server and a
real worker (workspaces with env secrets, user API tokens, agent tokens) holds no secret value
and no raw token, whether read with ``pg_dump``, in the web and worker logs at DEBUG (every SQL
statement logged with its parameters), or in PostgreSQL's own log, including the statement of an
INSERT that failed in PostgreSQL. Plus the pieces: key rotation, the data migration, the
production key check, the token command and the admin."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from tests.support import REPO, WebServer, Worker, lifecycle_queue, wait_for
from workspaces import services
from workspaces.crypto import EnvDecryptionError, SealedEnv
from workspaces.models import ApiToken, Workspace
from workspaces.status import WorkspaceStatus

QUEUE = "lifecycle-secrets"
PG_LOG_DIR = Path("/var/log/postgresql")


def _secret(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def _pg_log() -> Path | None:
    """PostgreSQL's own log file (Debian's default place), if this machine has one we can read."""
    logs = sorted(PG_LOG_DIR.glob("postgresql-*.log"), key=lambda path: path.stat().st_mtime)
    return logs[-1] if logs and os.access(logs[-1], os.R_OK) else None


@pytest.fixture
def stack(worker_env: dict[str, str]) -> Iterator[tuple[WebServer, Worker]]:
    """A web server and a worker as careless operators would run them: DEBUG everywhere, SQL
    logged with its parameters. Their tasks use a queue of their own."""
    env = {
        **worker_env,
        "DJANGO_SETTINGS_MODULE": "tests.settings_debug_sql",
        "DJANGO_DEBUG": "true",
        "LOG_LEVEL": "DEBUG",
        "CELERY_LIFECYCLE_QUEUE": QUEUE,
    }
    # Agents call this web server with their Bearer tokens (its log must not show them), so they
    # run as the platform's user: the workspace firewall opens only the session's registry port
    # to workspace uids. Isolation has its own tests (tests/isolation/); one owner here.
    env["WORKSPACE_PROCESS_ISOLATION"] = "none"
    web = WebServer(env, name="web-secrets")
    worker = Worker(
        {**env, "PLATFORM_URL": web.url}, name="secrets", queues=QUEUE, loglevel="DEBUG"
    )
    web.env = {**env, "PLATFORM_URL": web.url}
    web.start()
    worker.start()
    try:
        with lifecycle_queue(QUEUE):
            yield web, worker
    finally:
        worker.stop()
        web.stop()


def _agent_environ(workspace_id: str) -> dict[str, str]:
    from django.conf import settings

    instance = json.loads(
        (Path(settings.WORKSPACE_DATA_DIR) / workspace_id / "instance.json").read_text()
    )
    raw = Path(f"/proc/{instance['pid']}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(): value.decode() for key, value in pairs}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_no_secret_in_a_dump_or_any_log(stack, make_user, instances) -> None:
    web, worker = stack
    pg_log = _pg_log()
    pg_log_start = pg_log.stat().st_size if pg_log else 0

    make_user("alice")
    # The documented way to get a token: printed once by the command, never stored.
    printed = subprocess.run(
        [sys.executable, "manage.py", "drf_create_token", "alice"],
        cwd=REPO,
        env=web.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    token = re.fullmatch(r"Generated token ([0-9a-f]{40}) for user alice\n", printed)
    assert token is not None, printed
    user_tokens = [token.group(1), services.issue_api_token(make_user("bob"))]
    session = requests.Session()
    session.headers["Authorization"] = f"Token {user_tokens[0]}"

    secrets = {name: _secret(name.lower()) for name in ("ANTHROPIC_API_KEY", "DB_PASSWORD")}
    names = ["vault-1", "vault-2"]
    for name in names:
        response = session.post(
            f"{web.url}/api/workspaces/",
            json={"name": name, "template": "claude-code-default", "env": secrets},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        assert not set(secrets.values()) & set(json.dumps(response.json()).split('"'))
    ids = [str(row.id) for row in Workspace.objects.order_by("name")]

    # An INSERT that fails in PostgreSQL (the name is taken: the unique index refuses it) after
    # its statement, every parameter included, reached the server.
    failed_secret = _secret("failed-insert")
    clash = session.post(
        f"{web.url}/api/workspaces/",
        json={"name": "vault-1", "template": "shell-default", "env": {"X": failed_secret}},
        timeout=60,
    )
    assert clash.status_code == 400, clash.text
    all_secrets = [*secrets.values(), failed_secret]

    def online() -> bool:
        return all(Workspace.objects.get(id=i).status == WorkspaceStatus.ONLINE for i in ids)

    wait_for(online, timeout=90, message="both workspaces online")
    # Decrypted where the instance is launched, and only there: the agents have the values.
    agent_tokens = []
    for workspace_id in ids:
        environ = _agent_environ(workspace_id)
        assert {key: environ[key] for key in secrets} == secrets
        agent_tokens.append(environ["WORKSPACE_TOKEN"])
    # Agents registered and heartbeat with their Bearer tokens through this web server.
    wait_for(lambda: web.log().count("/api/registry/heartbeat") >= 2, message="agent heartbeats")
    assert session.get(f"{web.url}/api/workspaces/", timeout=60).status_code == 200

    host = connection.settings_dict["HOST"] or "127.0.0.1"
    dump = subprocess.run(
        ["pg_dump", "--no-owner", "-h", host, "-U", "postgres", connection.settings_dict["NAME"]],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    web_log, worker_log = web.log(), worker.log()
    # The channels are live: the dump holds the rows, the logs hold the SQL with its parameters.
    assert all(name in dump for name in names)
    assert 'INSERT INTO "workspaces_workspace"' in web_log
    assert 'UPDATE "workspaces_workspace"' in worker_log
    sources = {"pg_dump": dump, "web log": web_log, "worker log": worker_log}
    if pg_log is not None:
        with pg_log.open(errors="replace") as handle:
            handle.seek(pg_log_start)
            ours = handle.read()
        assert "workspace_name_unique_per_owner" in ours
        assert re.search(r'STATEMENT:\s+INSERT INTO "workspaces_workspace"', ours)
        sources["PostgreSQL log"] = ours
    else:
        pytest.fail(f"no readable PostgreSQL log under {PG_LOG_DIR}: one channel is unchecked")

    for label, text in sources.items():
        for value in [*all_secrets, *user_tokens, *agent_tokens]:
            assert value not in text, f"a secret or raw token is in the {label}"
    # The stored form of an env is ciphertext that the configured key opens.
    stored = Workspace.objects.get(id=ids[0]).env
    assert stored.token.startswith("gAAAAA") and stored.reveal() == secrets


# --- the pieces ----------------------------------------------------------------------------------
@pytest.mark.django_db
def test_rotation_re_encrypts_every_env_with_the_first_key(user, settings, capsys) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.ENV_ENCRYPTION_KEYS = [old]
    rows = [
        Workspace.objects.create(
            owner=user, name=f"r{index}", template="shell-default", env={"K": f"v{index}"}
        )
        for index in range(3)
    ]
    empty = Workspace.objects.create(owner=user, name="empty", template="shell-default")
    before = {row.id: row.env.token for row in rows}

    settings.ENV_ENCRYPTION_KEYS = [new, old]  # the new key first, the old one still decrypts
    call_command("rotate_env_key", "--batch-size", "2")
    assert "re-encrypted 3 workspace env(s)" in capsys.readouterr().out

    settings.ENV_ENCRYPTION_KEYS = [new]  # the old key dropped: everything still opens
    for index, row in enumerate(rows):
        row.refresh_from_db()
        assert row.env.token != before[row.id]
        assert row.env.reveal() == {"K": f"v{index}"}
    empty.refresh_from_db()
    assert empty.env.token == "" and empty.env.reveal() == {}

    settings.ENV_ENCRYPTION_KEYS = [old]  # a key that never wrote them opens nothing
    with pytest.raises(EnvDecryptionError):
        Workspace.objects.get(id=rows[0].id).env.reveal()


@pytest.mark.django_db
def test_env_is_sealed_on_assignment_and_never_shown(user) -> None:
    workspace = Workspace(owner=user, name="w", template="shell-default")
    workspace.env = {"API_KEY": "plain-value-123"}
    assert isinstance(workspace.env, SealedEnv)
    assert "plain-value-123" not in repr(workspace.env) + repr(workspace.__dict__)
    with pytest.raises(TypeError):
        workspace.env = "plain-value-123"  # type: ignore[assignment]


@pytest.mark.django_db(transaction=True)
def test_migration_encrypts_existing_env_and_hashes_existing_drf_tokens(user) -> None:
    executor = MigrationExecutor(connection)
    before = [("workspaces", "0006_proxy_app_port")]
    after = [("workspaces", "0007_secrets_at_rest")]
    latest = executor.loader.graph.leaf_nodes("workspaces")
    executor.migrate(before)
    workspace_id = uuid.uuid4()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO workspaces_workspace (id, owner_id, name, template, runtime, backend, "
            "status, desired_state, is_running, last_error, generation, requested_seq, "
            "handled_seq, env, backend_state, created_at, updated_at, env_version, "
            "started_env_version, last_activity_at, stop_reason, requested_by) VALUES (%s, %s, "
            "'old', 'shell-default', 'shell', 'process', 'stopped', 'stopped', false, '', 1, 1, "
            "1, %s, '{}', now(), now(), 0, 0, now(), '{}', '')",
            [workspace_id, user.pk, json.dumps({"OLD_SECRET": "legacy-value-42"})],
        )
        # DRF's authtoken table as an existing deployment has it.
        cursor.execute(
            "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, created timestamptz "
            "NOT NULL, user_id integer NOT NULL UNIQUE)"
        )
        cursor.execute("INSERT INTO authtoken_token VALUES (%s, now(), %s)", ["a" * 40, user.pk])
    try:
        MigrationExecutor(connection).migrate(after)
        with connection.cursor() as cursor:
            cursor.execute("SELECT env FROM workspaces_workspace WHERE id = %s", [workspace_id])
            stored = cursor.fetchone()[0]
            cursor.execute("SELECT count(*) FROM authtoken_token")
            left = cursor.fetchone()[0]
        assert "legacy-value-42" not in stored
        assert SealedEnv(stored).reveal() == {"OLD_SECRET": "legacy-value-42"}
        assert left == 0
        assert ApiToken.objects.get(user=user).digest == services.hash_token("a" * 40)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS authtoken_token")
        MigrationExecutor(connection).migrate(latest)
    # An existing client's token keeps working after the migration.
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token " + "a" * 40)
    assert client.get("/api/workspaces/").status_code == 200


def test_production_refuses_the_development_env_key() -> None:
    base = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "REQUIRE_SECRET_KEY": "true",
        "SECRET_KEY": "a-real-secret-key-for-this-test",
        "DJANGO_DEBUG": "false",
    }
    base.pop("ENV_ENCRYPTION_KEYS", None)
    refused = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env=base, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "ENV_ENCRYPTION_KEYS" in refused.stderr
    own_key = {**base, "ENV_ENCRYPTION_KEYS": Fernet.generate_key().decode()}
    accepted = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=own_key,
        capture_output=True,
        text=True,
    )
    assert accepted.returncode == 0, accepted.stderr
    bad = {**base, "ENV_ENCRYPTION_KEYS": "not-a-key"}
    malformed = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env=bad, capture_output=True, text=True
    )
    assert malformed.returncode != 0
    assert "ENV_ENCRYPTION_KEYS" in malformed.stderr and "not-a-key" not in malformed.stderr


@pytest.mark.django_db
def test_tokens_are_stored_hashed_and_the_admin_shows_none(user, make_user, client) -> None:
    key = services.issue_api_token(user)
    assert not ApiToken.objects.filter(digest=key).exists()
    assert ApiToken.objects.get(user=user).digest == services.hash_token(key)
    staff = make_user("root", staff=True)
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    listing = client.get("/admin/workspaces/apitoken/")
    assert listing.status_code == 200
    token = ApiToken.objects.get(user=user)
    page = client.get(f"/admin/workspaces/apitoken/{token.pk}/change/")
    assert page.status_code == 200
    for html in (listing.content.decode(), page.content.decode()):
        assert key not in html and token.digest not in html
        assert token.digest[:12] in html  # the fingerprint

    # The command prints a working key; -r replaces the user's tokens, so the old key stops.
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert api.get("/api/workspaces/").status_code == 200
    call_command("drf_create_token", "-r", user.username, stdout=(out := io.StringIO()))
    printed = re.fullmatch(
        rf"Generated token ([0-9a-f]{{40}}) for user {user.username}\n", out.getvalue()
    )
    assert printed is not None
    assert api.get("/api/workspaces/").status_code == 401
    api.credentials(HTTP_AUTHORIZATION=f"Token {printed.group(1)}")
    assert api.get("/api/workspaces/").status_code == 200
    assert ApiToken.objects.filter(user=user).count() == 1


def test_only_the_launching_cycle_decrypts_an_env() -> None:
    """Every call of ``.reveal()`` outside the tests: the start cycle, and the reverse step of the
    migration that introduced encryption (which writes plaintext back on purpose)."""
    import ast

    allowed = {"provisioning/lifecycle.py", "workspaces/migrations/0007_secrets_at_rest.py"}
    callers = set()
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith((".venv/", "tests/", "var/")):
            continue
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "reveal"
            ):
                callers.add(relative)
    assert callers == allowed
