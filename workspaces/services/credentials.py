"""Writes of credentials and secrets: user API tokens, and re-encrypting env values with the
current key (``manage.py drf_create_token``, ``manage.py rotate_env_key``, the admin)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth.models import User
from django.db import transaction

from workspaces.crypto import EnvDecryptionError, token_digest
from workspaces.models import ApiToken, Workspace


def issue_api_token(user: User, *, replace: bool = False) -> str:
    """A new API token for ``user``: the key is returned once and only its SHA-256 is stored.
    ``replace`` revokes the user's other tokens in the same transaction."""
    key = secrets.token_hex(20)  # DRF's key shape: 40 hex characters, 160 random bits
    with transaction.atomic():
        if replace:
            ApiToken.objects.filter(user=user).delete()
        ApiToken.objects.create(user=user, digest=token_digest(key))
    return key


def revoke_api_tokens(user: User) -> int:
    deleted, _ = ApiToken.objects.filter(user=user).delete()
    return deleted


@dataclass
class RotationReport:
    rotated: int = 0
    unchanged: int = 0  # empty env, or changed by someone else meanwhile (already current)
    failed: int = 0  # no configured key opens it


def rotate_env_encryption(*, batch_size: int = 500) -> RotationReport:
    """Re-encrypt every workspace's env with the first key of ``ENV_ENCRYPTION_KEYS``.

    Keyset batches over the primary key; each row is a compare-and-set on the ciphertext it read,
    so an env written meanwhile (already under the current key) is left as it is. Safe to run
    again, and while the platform runs.
    """
    report = RotationReport()
    last = None
    while True:
        rows = Workspace.objects.exclude(env="").order_by("id").values_list("id", "env")
        if last is not None:
            rows = rows.filter(id__gt=last)
        batch = list(rows[:batch_size])
        if not batch:
            return report
        for workspace_id, sealed in batch:
            try:
                fresh = sealed.rotated()
            except EnvDecryptionError:
                report.failed += 1
                continue
            updated = Workspace.objects.filter(id=workspace_id, env=sealed).update(env=fresh)
            if updated:
                report.rotated += 1
            else:
                report.unchanged += 1
        last = batch[-1][0]
