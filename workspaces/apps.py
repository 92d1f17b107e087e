import logging

from django.apps import AppConfig
from django.contrib.auth.signals import user_logged_out

from workspaces.manifests import templates

logger = logging.getLogger("workspaces")


class WorkspacesConfig(AppConfig):
    name = "workspaces"
    verbose_name = "Workspaces"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Report malformed manifests at start-up of every process (web, worker, beat), not only
        # when someone runs `manage.py check`.
        for error in templates().errors:
            logger.warning("template manifest error: %s", error)
        # Signal receivers are connected once the app registry is ready (Django's pattern).
        from workspaces import access

        user_logged_out.connect(access.on_user_logged_out, dispatch_uid="end-workspace-sessions")
