from __future__ import annotations

from django.apps import AppConfig


class ProvisioningConfig(AppConfig):
    name = "provisioning"
    verbose_name = "Provisioning"

    def ready(self) -> None:
        # Django's place to register checks and signal receivers: once the models are loaded.
        from provisioning import checks, worker  # noqa: F401
