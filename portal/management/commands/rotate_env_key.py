"""``python manage.py rotate_env_key``: re-encrypt every workspace's env with the first key of
``ENV_ENCRYPTION_KEYS``; ``--generate`` prints a new key.

Rotation: put a new key first in ``ENV_ENCRYPTION_KEYS`` (keep the old ones after it), restart
web and workers, run this command, then drop the old keys and restart again.
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet
from django.core.management.base import BaseCommand, CommandError, CommandParser

from workspaces import services


class Command(BaseCommand):
    help = "Re-encrypt every workspace env with the first key of ENV_ENCRYPTION_KEYS."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--generate", action="store_true", help="print a new Fernet key and exit"
        )
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args: Any, generate: bool, batch_size: int, **options: Any) -> None:
        if generate:
            self.stdout.write(Fernet.generate_key().decode())
            return
        report = services.rotate_env_encryption(batch_size=batch_size)
        self.stdout.write(
            f"re-encrypted {report.rotated} workspace env(s) with the first key; "
            f"{report.unchanged} changed meanwhile; {report.failed} not decryptable"
        )
        if report.failed:
            raise CommandError(
                f"{report.failed} env(s) could not be decrypted with any key in "
                "ENV_ENCRYPTION_KEYS: keep the key they were written with until they are rotated"
            )
