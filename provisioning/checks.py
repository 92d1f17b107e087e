from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, register

from provisioning.manifests import templates


@register("provisioning")
def check_template_manifests(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``manage.py check`` reports every malformed manifest with its path and field."""
    return [
        Error(f"{error.field}: {error.message}", obj=error.path, id="provisioning.E001")
        for error in templates().errors
    ]
