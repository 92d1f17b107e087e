"""Agents authenticate with ``Authorization: Bearer <workspace token>``; users with
``Authorization: Token <key>``, looked up by the key's SHA-256 (``ApiToken``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from workspaces import selectors, services
from workspaces.models import AgentToken


@dataclass(frozen=True)
class AgentPrincipal:
    """Stands in for ``request.user`` on agent calls."""

    token: AgentToken
    is_authenticated: bool = True
    is_staff: bool = False
    pk: None = None


class AgentTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[AgentPrincipal, AgentToken] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("malformed Bearer header")
        token = services.authenticate_agent(header[1].decode(errors="replace"))
        if token is None:
            raise exceptions.AuthenticationFailed("unknown or revoked workspace token")
        return AgentPrincipal(token), token

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class ApiTokenAuthentication(authentication.TokenAuthentication):
    """DRF's ``Token <key>`` scheme over hashed keys: the header, the 401 with
    ``WWW-Authenticate: Token`` and the messages are DRF's; only the lookup differs."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        token = selectors.api_token(key)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return token.user, token
