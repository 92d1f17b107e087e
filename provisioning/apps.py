from __future__ import annotations

import logging

from django.apps import AppConfig

logger = logging.getLogger("provisioning")


class ProvisioningConfig(AppConfig):
    name = "provisioning"
    verbose_name = "Provisioning"

    def ready(self) -> None:
        from provisioning import checks  # noqa: F401 - registers the system checks
        from provisioning.manifests import templates

        # Report malformed manifests at start-up of every process (web, worker, beat), not only
        # when someone runs `manage.py check`.
        for error in templates().errors:
            logger.warning("template manifest error: %s", error)
