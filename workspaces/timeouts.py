"""The one provisioning-timeout accessor, used by the API and the sweeper alike (and the idle
timeout accessor, used by the API and the idle sweep).

Order: ``PROVISION_TIMEOUT_SECONDS`` (global override) > the manifest's
``runtime_config.provision_timeout_seconds`` > the runtime's default from settings
(``RUNTIME_PROVISION_TIMEOUTS``) > ``DEFAULT_PROVISION_TIMEOUT_SECONDS`` (600 s).
"""

from __future__ import annotations

from django.conf import settings

from workspaces.manifests import TemplateSet, templates


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


def idle_timeout_seconds(
    template: str, runtime: str | None = None, *, template_set: TemplateSet | None = None
) -> int:
    """The idle auto-stop timeout of a workspace of ``template``; 0 means never.

    Order: the manifest's ``runtime_config.idle_timeout_seconds`` (0 turns the policy off for
    that template) > the ``<runtime>-default`` manifest's, when the template is gone >
    ``IDLE_TIMEOUT_SECONDS`` (default 0). The API's ``idle_stop_at`` and the idle sweep call this.
    """
    template_set = template_set or templates()
    manifest = template_set.get(template)
    if manifest is None and runtime:
        manifest = template_set.runtime_default(runtime)
    if manifest is not None and manifest.idle_timeout_seconds is not None:
        return manifest.idle_timeout_seconds
    return int(settings.IDLE_TIMEOUT_SECONDS)
