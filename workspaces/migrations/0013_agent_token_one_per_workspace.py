"""One agent token per workspace (it was one per generation, with older generations' rows
deleted by every cycle), so a cycle replaces it with one upsert."""

from django.db import migrations, models
from django.db.models import Max, OuterRef, Subquery


def keep_the_newest(apps, schema_editor):
    """A cycle's begin left one row per workspace already; keep only the newest generation's,
    should any workspace hold more."""
    AgentToken = apps.get_model("workspaces", "AgentToken")
    newest = (
        AgentToken.objects.filter(workspace_id=OuterRef("workspace_id"))
        .values("workspace_id")
        .annotate(top=Max("generation"))
        .values("top")
    )
    AgentToken.objects.exclude(generation=Subquery(newest)).delete()


class Migration(migrations.Migration):
    dependencies = [("workspaces", "0012_workspace_sandbox")]

    operations = [
        migrations.RunPython(keep_the_newest, migrations.RunPython.noop),
        migrations.RemoveConstraint(model_name="agenttoken", name="agent_token_one_per_generation"),
        migrations.AddConstraint(
            model_name="agenttoken",
            constraint=models.UniqueConstraint(
                fields=("workspace",), name="agent_token_one_per_workspace"
            ),
        ),
    ]
