"""The registry listener: the only platform endpoint workspaces can reach.

A second WSGI entry point that serves ``/api/registry/*`` (the agent's calls) and answers 404 to
every other path before Django sees it, so a workspace that reaches this port reaches nothing
else of the API, the admin or the docs. It listens where workspaces can connect (``REGISTRY_BIND``,
e.g. ``0.0.0.0:8001``: the Docker networks' gateways and loopback), and ``PLATFORM_URL`` names it;
the full API stays on the web listener, which workspaces cannot reach.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
_django = get_wsgi_application()

from django.core import signals  # noqa: E402 - after Django is set up
from django.core.exceptions import ObjectDoesNotExist  # noqa: E402
from django.db import Error as DatabaseError  # noqa: E402

from workspaces import services  # noqa: E402


def _host_for_django() -> str:
    """Agents call whatever address reaches the host from their network (a Docker gateway such
    as 172.30.0.1, which no ALLOWED_HOSTS lists); the agent's bearer token, not the Host header,
    is what the registry trusts, so requests reach Django under an allowed host name."""
    for host in settings.ALLOWED_HOSTS:
        name = host.lstrip(".")
        if name and name != "*":
            return name
    return "localhost"


_HOST = _host_for_django()
REGISTRY_PREFIX = "/api/registry/"
_NOT_FOUND = json.dumps(
    {"detail": "not found: this listener serves only the agent endpoints (/api/registry/*)"}
).encode()


HEARTBEAT_PATH = REGISTRY_PREFIX + "heartbeat"
REGISTER_PATH = REGISTRY_PREFIX + "register"
# An agent call's body is about a hundred bytes; a larger one takes Django's path and its limits.
_CALL_BODY_LIMIT = 1024
_FLAGS = ("healthy", "active", "config_copied")


def _small_body(environ: dict[str, Any]) -> bytes | None:
    """The body of a request that says it is small (and reads as long as it says), else None."""
    announced = environ.get("CONTENT_LENGTH") or ""
    if (
        not (announced.isascii() and announced.isdigit())
        or not 0 < int(announced) <= _CALL_BODY_LIMIT
    ):
        return None
    return bytes(environ["wsgi.input"].read(int(announced)))


def _agent_call(
    authorization: str, content_type: str, body: bytes
) -> tuple[str, uuid.UUID, dict[str, bool]] | None:
    """The raw token, the workspace id and the flags (``_FLAGS``, as JSON booleans) of a
    well-formed agent call: a Bearer token and a JSON body of at most 1 KiB. None otherwise."""
    if len(body) > _CALL_BODY_LIMIT:
        return None
    header = authorization.split()
    if len(header) != 2 or header[0].lower() != "bearer" or not header[1].isascii():
        return None
    if content_type.split(";")[0].strip() != "application/json":
        return None
    try:
        data = json.loads(body)
        workspace_id = uuid.UUID(data["workspace_id"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    flags = {name: data[name] for name in _FLAGS if name in data}
    if not all(isinstance(value, bool) for value in flags.values()):
        return None  # the view's serializer reads other spellings, or refuses them
    return header[1], workspace_id, flags


def _answer(workspace_id: uuid.UUID, status: str, generation: int) -> bytes:
    """What the agent views answer (``AgentResponseSerializer``)."""
    reply = {"workspace_id": str(workspace_id), "status": status, "generation": generation}
    return json.dumps(reply, separators=(",", ":")).encode()


def beat_reply(authorization: str, content_type: str, body: bytes) -> bytes | None:
    """The common heartbeat without Django's request machinery: a well-formed call
    (``_agent_call``) for a workspace already where the beat says, recorded by ``services.beat``
    in one statement that checks the token too. The answer is the view's. None for anything else
    (another shape, a token the statement does not match, a status to change, a database error):
    the request then goes to the view, which refuses or decides it and says why. Runs in a thread
    of the listener's, with that thread's database connection."""
    call = _agent_call(authorization, content_type, body)
    if call is None:
        return None
    raw_token, workspace_id, flags = call
    # The signals Django's handler sends around a request: a database connection past its age
    # or broken is dropped before and after, as for every other request.
    signals.request_started.send(sender=type(_django), environ=None)
    try:
        answer = services.beat(
            services.hash_token(raw_token),
            workspace_id,
            healthy=flags.get("healthy", True),
            active=flags.get("active", False),
        )
    except DatabaseError:
        return None  # the view meets it too and answers 503
    finally:
        signals.request_finished.send(sender=type(_django))
    return None if answer is None else _answer(answer.id, answer.status, answer.generation)


def register_reply(authorization: str, content_type: str, body: bytes) -> bytes | None:
    """A registration without Django's request machinery: a well-formed call (``_agent_call``)
    whose token ``services.register_agent`` accepts, which it records exactly as the view does
    (the same function). None for anything it refuses or cannot do (an unknown, stale or foreign
    token, a workspace that is stopping or removed, a database error): nothing was written, and
    the view then decides the request and says why."""
    call = _agent_call(authorization, content_type, body)
    if call is None:
        return None
    raw_token, workspace_id, flags = call
    signals.request_started.send(sender=type(_django), environ=None)
    try:
        token = services.authenticate_agent(raw_token)
        if token is None:
            return None
        workspace = services.register_agent(
            token, workspace_id, config_copied=flags.get("config_copied", False)
        )
    except (
        DatabaseError,
        ObjectDoesNotExist,
        services.AgentAuthError,
        services.TransitionNotAllowed,
    ):
        return None
    finally:
        signals.request_finished.send(sender=type(_django))
    return _answer(workspace.id, workspace.status, workspace.generation)


_FAST = {HEARTBEAT_PATH: beat_reply, REGISTER_PATH: register_reply}


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The listener as a WSGI application: the common heartbeat (``beat_reply``) and
    registration (``register_reply``), else ``_endpoints``."""
    path = os.path.normpath(environ.get("PATH_INFO") or "/")
    fast = _FAST.get(path)
    if fast is not None and environ.get("REQUEST_METHOD") == "POST":
        body = _small_body(environ)
        if body is not None:
            reply = fast(
                environ.get("HTTP_AUTHORIZATION") or "", environ.get("CONTENT_TYPE") or "", body
            )
            if reply is not None:
                start_response(
                    "200 OK",
                    [
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(reply))),
                        ("X-Content-Type-Options", "nosniff"),
                    ],
                )
                return [reply]
            environ["wsgi.input"] = io.BytesIO(body)  # read once: the view reads it again
    return _endpoints(environ, start_response)


def _endpoints(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/api/registry/*`` through Django (the views decide everything); any other path 404."""
    path = os.path.normpath(environ.get("PATH_INFO") or "/")
    if path.startswith(REGISTRY_PREFIX):
        # The normalised path, so /api/registry/../workspaces/ cannot slip through.
        environ["PATH_INFO"] = path
        environ["HTTP_HOST"] = _HOST
        return _django(environ, start_response)
    start_response(
        "404 Not Found",
        [("Content-Type", "application/json"), ("Content-Length", str(len(_NOT_FOUND)))],
    )
    return [_NOT_FOUND]
