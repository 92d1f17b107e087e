"""Workspace env values at rest: sealed with Fernet (``cryptography``), opened only to launch.

A workspace's env is a ``SealedEnv``: the Fernet token of its JSON, never the values. Loading a
row does not decrypt anything; ``reveal()`` does, and only the start cycle calls it, right where
the instance's environment is put together (``provisioning.lifecycle``). So a database dump, a
logged SQL statement (Django's or PostgreSQL's own, including a failed INSERT) and a row that
some read path loads carry ciphertext only.

Keys come from ``settings.ENV_ENCRYPTION_KEYS`` (``MultiFernet``): the first key encrypts, every
key decrypts, which is what key rotation needs (``manage.py rotate_env_key``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver


class EnvDecryptionError(Exception):
    """A sealed env that none of the configured keys opens (a key was dropped too early)."""


@cache
def _keys() -> MultiFernet:
    return MultiFernet([Fernet(key) for key in settings.ENV_ENCRYPTION_KEYS])


@receiver(setting_changed)
def _forget_keys(setting: str, **kwargs: Any) -> None:
    if setting == "ENV_ENCRYPTION_KEYS":
        _keys.cache_clear()


class SealedEnv:
    """An env as stored: a Fernet token (``""`` for an empty env). Shows no value in ``repr``,
    logs or tracebacks; ``reveal()`` decrypts."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token

    @classmethod
    def seal(cls, env: Mapping[str, str]) -> SealedEnv:
        if not env:
            return cls("")
        plain = json.dumps(dict(env), sort_keys=True, separators=(",", ":"))
        return cls(_keys().encrypt(plain.encode()).decode("ascii"))

    def reveal(self) -> dict[str, str]:
        if not self.token:
            return {}
        try:
            plain = _keys().decrypt(self.token.encode("ascii"))
        except InvalidToken:
            raise EnvDecryptionError(
                "no key in ENV_ENCRYPTION_KEYS decrypts this workspace's env"
            ) from None
        return dict(json.loads(plain))

    def rotated(self) -> SealedEnv:
        """The same env encrypted with the first key (unchanged when empty)."""
        if not self.token:
            return self
        try:
            return SealedEnv(_keys().rotate(self.token.encode("ascii")).decode("ascii"))
        except InvalidToken:
            raise EnvDecryptionError(
                "no key in ENV_ENCRYPTION_KEYS decrypts this workspace's env"
            ) from None

    def __bool__(self) -> bool:
        return bool(self.token)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SealedEnv) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)

    def __repr__(self) -> str:
        return "<SealedEnv empty>" if not self.token else "<SealedEnv sealed>"


def token_digest(raw: str) -> str:
    """The SHA-256 a token (an agent's or a user's API key) is stored and looked up by; never
    the token itself. A lone surrogate is hashed as it is, not an error."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()
