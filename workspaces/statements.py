"""The hottest statements of a workspace's life, their SQL built once per process from the
models' metadata.

The ORM builds the SQL of a query from scratch on every call. Measured in one process against
the same statement here (thread CPU, 2026-12-06): the workspace's locked read with its owner 1.30
against 0.45 ms (with its transaction), a status ``UPDATE`` 0.66 against 0.20, an API token read
with its user 0.67 against 0.13, an agent token read 0.53 against 0.12, a cycle's fenced
``UPDATE`` 0.35 against 0.16, an event's ``INSERT`` 0.27 against 0.15; a start cycle and a
registration run most of them once. Here each statement is written once per process and per
shape, values are prepared by the model fields (``get_db_prep_save``) and rows are loaded through
the fields' converters into model instances as the ORM loads them (``Model.from_db``), so callers
get the same objects and PostgreSQL runs the same statements. Tests compare each with its ORM
twin (tests/workspaces/test_statements.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import F, Field, Model

from workspaces.models import AgentToken, ApiToken, Workspace, WorkspaceEvent
from workspaces.status import WorkspaceStatus

Converter = Callable[[Any, Any, Any], Any]


def quote(name: str) -> str:
    return connection.ops.quote_name(name)


def column(model: type[Model], name: str) -> str:
    """The quoted column of ``model``'s field ``name`` (a field name or an attname)."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field) and field.column
    return quote(field.column)


def table(model: type[Model]) -> str:
    return quote(model._meta.db_table)


class _Loader:
    """Rows of ``model``'s concrete fields (``only`` those attnames, the others deferred as
    ``.only()`` leaves them), in field order, into instances as the ORM builds them: each value
    through the field's and the backend's converters, then ``from_db``."""

    def __init__(self, model: type[Model], alias: str, only: Iterable[str] | None = None) -> None:
        self.model = model
        wanted = None if only is None else set(only)
        self.fields = [
            f for f in model._meta.concrete_fields if wanted is None or f.attname in wanted
        ]
        self.attnames = tuple(f.attname for f in self.fields)
        self.columns = ", ".join(f"{alias}.{quote(str(f.column))}" for f in self.fields)
        self.converters: list[tuple[int, list[Converter], Any]] = []
        for index, field in enumerate(self.fields):
            col = field.get_col(alias)
            found = [*connection.ops.get_db_converters(col), *field.get_db_converters(connection)]
            if found:
                self.converters.append((index, found, col))

    def load(self, values: Sequence[Any]) -> Model:
        row = list(values)
        for index, converters, col in self.converters:
            value = row[index]
            for convert in converters:
                value = convert(value, col, connection)
            row[index] = value
        return self.model.from_db(connection.alias, self.attnames, row)


class Read:
    """One row of ``model`` by the unique column ``key``, and the user its foreign key
    ``user_field`` points at (loaded as ``select_related`` loads it; read, not locked).
    ``only`` / ``user_only``: the attnames to load of each, the others deferred."""

    def __init__(
        self,
        model: type[Model],
        key: str,
        user_field: str | None = None,
        *,
        lock: bool = False,
        only: Iterable[str] | None = None,
        user_only: Iterable[str] | None = None,
    ) -> None:
        self.rows = _Loader(model, "r", only)
        sql = f"SELECT {self.rows.columns}"
        self.users: _Loader | None = None
        self.user_field: Any = None
        if user_field is None:
            sql += f" FROM {table(model)} r"
        else:
            users = get_user_model()
            self.users = _Loader(users, "u", user_only)
            self.user_field = model._meta.get_field(user_field)
            sql += f", {self.users.columns} FROM {table(model)} r JOIN {table(users)} u "
            sql += f"ON u.{quote(str(users._meta.pk.column))} = r.{column(model, user_field)}"
        sql += f" WHERE r.{column(model, key)} = %s"
        # The row's lock only: its user may be locked by another transaction meanwhile.
        self.sql = sql + (" FOR UPDATE OF r" if lock else "")

    def __call__(self, value: Any) -> Model | None:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, [value])
            row = cursor.fetchone()
        if row is None:
            return None
        split = len(self.rows.fields)
        found = self.rows.load(row[:split])
        if self.users is not None:
            self.user_field.set_cached_value(found, self.users.load(row[split:]))
        return found


@functools.cache
def _reads() -> dict[str, Read]:
    return {
        "locked_workspace": Read(Workspace, "id", "owner", lock=True),
        "agent_token": Read(AgentToken, "token_hash"),
        "api_token": Read(ApiToken, "digest", "user"),
    }


def locked_workspace(workspace_id: UUID) -> Workspace | None:
    """The whole row, locked until the transaction ends, with its owner loaded (not locked), as
    ``select_for_update(of=("self",)).select_related("owner")`` reads it; None when absent."""
    workspace = _reads()["locked_workspace"](workspace_id)
    assert workspace is None or isinstance(workspace, Workspace)
    return workspace


def agent_token(token_hash: str) -> AgentToken | None:
    """The agent token with this digest (unique), or None."""
    token = _reads()["agent_token"](token_hash)
    assert token is None or isinstance(token, AgentToken)
    return token


def api_token(digest: str) -> ApiToken | None:
    """The API token with this digest (unique) and its user, as ``select_related("user")``
    reads it, or None. Every API request reads it."""
    token = _reads()["api_token"](digest)
    assert token is None or isinstance(token, ApiToken)
    return token


@functools.cache
def _ports_sql() -> str:
    port, status = column(Workspace, "app_port"), column(Workspace, "status")
    return f"SELECT {port} FROM {table(Workspace)} WHERE {status} <> %s AND {port} = ANY(%s)"


def ports_in_use(candidates: Iterable[int]) -> set[int]:
    """Which of these app ports a workspace that is not removed holds (the unique index of
    ``workspace_app_port_unique_live`` answers it)."""
    with connection.cursor() as cursor:
        cursor.execute(_ports_sql(), [WorkspaceStatus.REMOVED.value, list(candidates)])
        return {port for (port,) in cursor.fetchall()}


# --- a heartbeat's UPDATE (``services.agent.beat``) ---------------------------------------------
@functools.cache
def beat_sql(active: bool) -> str:
    """The common heartbeat in one statement that is its authentication too: the clocks of the
    workspace whose current cycle's token has this digest, at the status the beat confirms;
    returns the generation. Parameters: the clocks, the digest, the workspace id, the status."""
    clocks = ["last_heartbeat_at", *(["last_activity_at"] if active else [])]
    workspace_id = column(Workspace, "id")
    return (
        f"UPDATE {table(Workspace)} AS w"
        f" SET {', '.join(f'{column(Workspace, name)} = %s' for name in clocks)}"
        f" FROM {table(AgentToken)} AS t"
        f" WHERE t.{column(AgentToken, 'token_hash')} = %s AND w.{workspace_id} = %s"
        f" AND t.{column(AgentToken, 'workspace')} = w.{workspace_id}"
        f" AND w.{column(Workspace, 'generation')} = t.{column(AgentToken, 'generation')}"
        f" AND w.{column(Workspace, 'status')} = %s"
        f" RETURNING w.{column(Workspace, 'generation')}"
    )


# --- the status UPDATE of ``services.common.transition`` -----------------------------------------
@functools.cache
def _transition_sql(
    sources: int,
    fenced: bool,
    plain: tuple[str, ...],
    copied: tuple[tuple[str, str], ...],
) -> str:
    """One shape of the status write, for a number of source statuses: ``plain`` fields take
    values, ``copied`` ones another column of the row (``F("env_version")``), in that order after
    the status and its clocks."""
    status, changed = column(Workspace, "status"), column(Workspace, "status_changed_at")
    sets = [
        f"{status} = %s",
        f"{column(Workspace, 'updated_at')} = %s",
        # The time-in-state clock restarts only when the status really changes.
        f"{changed} = CASE WHEN {status} = %s THEN {changed} ELSE %s END",
        *(f"{column(Workspace, name)} = %s" for name in plain),
        *(f"{column(Workspace, name)} = {column(Workspace, source)}" for name, source in copied),
    ]
    where = [f"{column(Workspace, 'id')} = %s", f"{status} IN ({', '.join(['%s'] * sources)})"]
    if fenced:
        where.append(f"{column(Workspace, 'generation')} = %s")
    return f"UPDATE {table(Workspace)} SET {', '.join(sets)} WHERE {' AND '.join(where)}"


def plain_values(fields: dict[str, Any]) -> bool:
    """Whether ``update_status`` can write these values: plain ones, or ``F`` of a column (not
    an expression computed from it, such as ``F("requested_seq") + 1``, nor a model instance,
    which the ORM turns into its key)."""
    return all(
        type(value) is F
        or not (hasattr(value, "resolve_expression") or hasattr(value, "prepare_database_save"))
        for value in fields.values()
    )


def update_status(
    workspace_id: UUID,
    to: str,
    sources: Iterable[str],
    now: datetime,
    expect_generation: int | None,
    fields: dict[str, Any],
) -> bool:
    """``transition``'s UPDATE (the caller checked the transition table); whether the row
    changed. Values are plain values or ``F`` of another column."""
    ordered_sources = tuple(sorted(sources))
    plain = tuple(name for name, value in fields.items() if type(value) is not F)
    copied = tuple(
        (name, value.name)  # type: ignore[attr-defined]  # F.name: the column it refers to
        for name, value in fields.items()
        if type(value) is F
    )
    sql = _transition_sql(len(ordered_sources), expect_generation is not None, plain, copied)
    status = _prepared(Workspace, "status", to)
    prepared = [_prepared(Workspace, name, fields[name]) for name in plain]
    params: list[Any] = [
        status,
        now,
        status,
        now,
        *prepared,
        _prepared(Workspace, "id", workspace_id),
        *(_prepared(Workspace, "status", source) for source in ordered_sources),
    ]
    if expect_generation is not None:
        params.append(expect_generation)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount == 1


@functools.cache
def _field(model: type[Model], name: str) -> Field:
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field


def _prepared(model: type[Model], name: str, value: Any) -> Any:
    return _field(model, name).get_db_prep_save(value, connection)


@functools.cache
def _fenced_sql(plain: tuple[str, ...], not_in: tuple[str, ...]) -> str:
    sets = ", ".join(f"{column(Workspace, name)} = %s" for name in plain)
    where = f"{column(Workspace, 'id')} = %s AND {column(Workspace, 'generation')} = %s"
    if not_in:
        where += f" AND {column(Workspace, 'status')} NOT IN ({', '.join(['%s'] * len(not_in))})"
    return f"UPDATE {table(Workspace)} SET {sets} WHERE {where}"


def update_fenced(
    workspace_id: UUID, generation: int, fields: dict[str, Any], not_in: Iterable[str] = ()
) -> bool:
    """``UPDATE ... WHERE id = %s AND generation = %s`` (and, when given, the status is none of
    ``not_in``) of plain values; whether the row changed."""
    plain, excluded = tuple(fields), tuple(sorted(not_in))
    params: list[Any] = [_prepared(Workspace, name, fields[name]) for name in plain]
    params += [_prepared(Workspace, "id", workspace_id), generation]
    params += [_prepared(Workspace, "status", status) for status in excluded]
    with connection.cursor() as cursor:
        cursor.execute(_fenced_sql(plain, excluded), params)
        return cursor.rowcount == 1


# --- an event's INSERT (``services.common.record_event``) ----------------------------------------
_EVENT_FIELDS = ("workspace", "type", "source", "generation", "payload", "actor", "created_at")


@functools.cache
def _event_sql() -> str:
    columns = ", ".join(column(WorkspaceEvent, name) for name in _EVENT_FIELDS)
    values = ", ".join(["%s"] * len(_EVENT_FIELDS))
    return (
        f"INSERT INTO {table(WorkspaceEvent)} ({columns}) VALUES ({values}) "
        f"RETURNING {column(WorkspaceEvent, 'id')}"
    )


def insert_event(
    workspace_id: UUID,
    type: str,
    source: str,
    generation: int,
    payload: dict[str, Any],
    actor: str,
    created_at: datetime,
) -> WorkspaceEvent:
    """``WorkspaceEvent.objects.create`` with these values, in one statement built once."""
    event = WorkspaceEvent(
        workspace_id=workspace_id,
        type=type,
        source=source,
        generation=generation,
        payload=payload,
        actor=actor,
        created_at=created_at,
    )
    params = [
        _prepared(WorkspaceEvent, name, getattr(event, _field(WorkspaceEvent, name).attname))
        for name in _EVENT_FIELDS
    ]
    with connection.cursor() as cursor:
        cursor.execute(_event_sql(), params)
        (event.id,) = cursor.fetchone()
    event._state.adding = False
    event._state.db = connection.alias
    return event
