from django.apps import AppConfig


class PortalConfig(AppConfig):
    """The faces: the REST API, the dashboard, the admin, the management commands and the live
    streams, on top of the engine (``provisioning``) and the domain (``workspaces``)."""

    name = "portal"
    verbose_name = "Portal"
