from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings

from workspaces.manifests import Template, templates


def template_choices() -> list[tuple[str, str]]:
    items = sorted(templates().templates.values(), key=lambda template: template.name)
    return [(template.name, _describe(template)) for template in items]


def _describe(template: Template) -> str:
    if template.is_team:
        return f"{template.name} (team: {', '.join(template.members)})"
    return f"{template.name} ({template.runtime})"


class CreateWorkspaceForm(forms.Form):
    name = forms.CharField(
        max_length=63,
        widget=forms.TextInput(attrs={"placeholder": "my-workspace", "autocomplete": "off"}),
        help_text="lowercase letters, digits and '-'",
    )
    template = forms.ChoiceField(choices=())
    env = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "KEY=value, one per line"}),
        help_text="one KEY=value per line; values are write-only (never shown again)",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["template"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = template_choices()
        field.initial = settings.WORKSPACE_DEFAULT_TEMPLATE

    def clean_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for number, line in enumerate(self.cleaned_data.get("env", "").splitlines(), start=1):
            if not line.strip():
                continue
            key, equals, value = line.partition("=")
            if not equals:
                raise forms.ValidationError(f"line {number}: expected KEY=value")
            env[key.strip()] = value
        return env
