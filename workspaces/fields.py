"""``SealedEnvField``: a text column holding a workspace's env encrypted (``workspaces.crypto``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import models
from django.db.models.expressions import Combinable
from django.db.models.query_utils import DeferredAttribute

from workspaces.crypto import SealedEnv


def _sealed(value: Any) -> SealedEnv:
    if isinstance(value, SealedEnv):
        return value
    if value is None or value == "":
        return SealedEnv("")
    if isinstance(value, Mapping):
        return SealedEnv.seal(value)
    # A bare string could be plaintext mistaken for a token, or the reverse: refuse both.
    raise TypeError(f"a workspace env is a mapping or a SealedEnv, not {type(value).__name__}")


class _SealOnAssign(DeferredAttribute):
    """``workspace.env = {...}`` encrypts at once: plaintext never sits on a model instance."""

    def __set__(self, instance: models.Model, value: Any) -> None:
        instance.__dict__[self.field.attname] = _sealed(value)


class SealedEnvField(models.TextField):
    """Stores ``SealedEnv.token``; loads a ``SealedEnv`` without decrypting it. Accepts a mapping
    anywhere a value is written (create, assignment, ``update(env={})``) and seals it."""

    descriptor_class = _SealOnAssign
    # What django-stubs' plugin types the attribute as: a mapping goes in, a SealedEnv comes out.
    _pyi_private_set_type: Mapping[str, str] | SealedEnv | Combinable  # type: ignore[assignment]
    _pyi_private_get_type: SealedEnv  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default", "")
        kwargs.setdefault("blank", True)
        kwargs["editable"] = False
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("editable", None)
        if kwargs.get("default") == "":
            kwargs.pop("default")
        if kwargs.get("blank") is True:
            kwargs.pop("blank")
        return name, path, args, kwargs

    def get_default(self) -> SealedEnv:
        return SealedEnv("")

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> SealedEnv:
        return SealedEnv(value or "")

    def to_python(self, value: Any) -> SealedEnv:
        if isinstance(value, str):
            return SealedEnv(value)
        return _sealed(value)

    def get_prep_value(self, value: Any) -> str:
        return _sealed(value).token

    def value_to_string(self, obj: models.Model) -> str:
        # Serialization (dumpdata) carries the ciphertext only.
        return _sealed(self.value_from_object(obj)).token
