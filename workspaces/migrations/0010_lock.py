"""The named locks (``workspaces.locks``) replace transaction-scoped advisory locks; their rows
are made here, so that a request does not make them (``locks.hold`` still makes a missing one)."""

from typing import Any

from django.db import migrations, models

NAMES = ("provisioning_admission", "uids")


def make_locks(apps: Any, schema_editor: Any) -> None:
    Lock = apps.get_model("workspaces", "Lock")
    Lock.objects.bulk_create([Lock(name=name) for name in NAMES], ignore_conflicts=True)


class Migration(migrations.Migration):
    dependencies = [
        ("workspaces", "0009_workspace_subdomain"),
    ]

    operations = [
        migrations.CreateModel(
            name="Lock",
            fields=[
                ("name", models.CharField(max_length=64, primary_key=True, serialize=False)),
            ],
        ),
        migrations.RunPython(make_locks, migrations.RunPython.noop),
    ]
