"""``python manage.py drf_create_token <username>``: issue a user API token and print it once.

Same name and output as Django REST framework's command, but the key is stored as its SHA-256
(``ApiToken``), so it is shown only here. ``-r`` revokes the user's other tokens.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from workspaces import services


class Command(BaseCommand):
    help = "Create an API token for a user and print it (it cannot be shown again)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "-r",
            "--reset",
            action="store_true",
            help="revoke the user's other API tokens",
        )

    def handle(self, *args: Any, username: str, reset: bool, **options: Any) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"Cannot create the Token: user {username} does not exist") from None
        key = services.issue_api_token(user, replace=reset)
        self.stdout.write(f"Generated token {key} for user {username}")
