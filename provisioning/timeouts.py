"""The one provisioning-timeout accessor, used by the API and the sweeper alike.

Order: ``PROVISION_TIMEOUT_SECONDS`` (global override) > the manifest's
``runtime_config.provision_timeout_seconds`` > the runtime's default from settings
(``RUNTIME_PROVISION_TIMEOUTS``) > ``DEFAULT_PROVISION_TIMEOUT_SECONDS`` (600 s).
"""

from __future__ import annotations

from django.conf import settings

from provisioning.manifests import TemplateSet, templates


def provision_timeout_seconds(
    template: str, runtime: str | None = None, *, template_set: TemplateSet | None = None
) -> int:
    override = settings.PROVISION_TIMEOUT_SECONDS
    if override:
        return int(override)
    manifest = (template_set or templates()).get(template)
    if manifest is not None and manifest.provision_timeout_seconds:
        return manifest.provision_timeout_seconds
    runtime_name = runtime or (manifest.runtime if manifest is not None else None)
    if runtime_name and runtime_name in settings.RUNTIME_PROVISION_TIMEOUTS:
        return int(settings.RUNTIME_PROVISION_TIMEOUTS[runtime_name])
    return int(settings.DEFAULT_PROVISION_TIMEOUT_SECONDS)
