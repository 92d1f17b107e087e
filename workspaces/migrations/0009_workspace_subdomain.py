# The proxy serves every workspace through one route and asks the platform which workspace a
# host belongs to: each row records the first label of its host, filled here for existing rows.

from django.db import migrations, models


def fill_subdomains(apps, schema_editor):  # type: ignore[no-untyped-def]
    # In SQL, as workspaces.access.owner_label does it at this migration's date: the username
    # lowercased, every run of other characters than a-z, 0-9 and "-" made one "-", "-" trimmed
    # at both ends, 63 characters at most, "user" when nothing is left.
    schema_editor.execute(
        """
        UPDATE workspaces_workspace AS w
           SET subdomain = w.name || '--' || COALESCE(NULLIF(LEFT(BTRIM(
                   REGEXP_REPLACE(LOWER(u.username), '[^a-z0-9-]+', '-', 'g'), '-'), 63), ''),
                   'user')
          FROM auth_user AS u
         WHERE u.id = w.owner_id
        """
    )


class Migration(migrations.Migration):
    dependencies = [
        ("workspaces", "0008_selfheal_restart_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="workspace",
            name="subdomain",
            field=models.CharField(default="", editable=False, max_length=128),
        ),
        migrations.RunPython(fill_subdomains, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="workspace",
            index=models.Index(
                condition=models.Q(("status", "removed"), _negated=True),
                fields=["subdomain", "created_at"],
                name="ws_live_host",
            ),
        ),
    ]
