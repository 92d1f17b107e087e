from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, register

from workspaces.manifests import templates


@register("provisioning")
def check_template_manifests(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``manage.py check`` reports every malformed manifest with its path and field."""
    return [
        Error(f"{error.field}: {error.message}", obj=error.path, id="provisioning.E001")
        for error in templates().errors
    ]


@register("provisioning")
def check_process_isolation(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Start-up refuses the process backend when it cannot isolate workspaces (not root) and
    nobody said that unisolated single-user development is what they want."""
    import os

    from django.conf import settings

    if settings.WORKSPACE_BACKEND != "process" or settings.WORKSPACE_PROCESS_ISOLATION != "uid":
        return []
    if os.geteuid() == 0:
        return []
    from provisioning.backends.process import NOT_ROOT

    return [Error(NOT_ROOT, obj="WORKSPACE_PROCESS_ISOLATION", id="provisioning.E002")]


@register("provisioning")
def check_docker_wiring(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Start-up refuses ``DOCKER_NETWORK_MODE=veth`` on the Docker backend when this process
    cannot wire containers (not root): every launch would fail after the container started."""
    from django.conf import settings

    if settings.WORKSPACE_BACKEND != "docker" or settings.DOCKER_NETWORK_MODE != "veth":
        return []
    from provisioning.backends import veth

    try:
        veth.check()
    except veth.VethError as exc:
        return [Error(str(exc), obj="DOCKER_NETWORK_MODE", id="provisioning.E003")]
    return []
