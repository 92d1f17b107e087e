"""Settings for the workspace control plane, read from the environment: Django's one settings
module (``DJANGO_SETTINGS_MODULE=project.settings``), kept in parts by concern.

Every value has a local default that works against PostgreSQL and Redis on 127.0.0.1. A malformed
value stops start-up with a message naming the variable (see ``project.env``).

Each reader's ``doc=`` is its text in the configuration reference (docs/configuration.md, printed
by ``python -m project.env``), under the section the last ``section(...)`` call above it names; a
comment beside a reader says only what its doc does not: why.

The parts run in the order of ``PARTS``; a part takes what it needs of an earlier one by name
(``from project.settings.web import REDIS_URL``), never from a later one.
"""

# In the order of PARTS (not sorted): the reference lists a section's variables in the order
# they are read.
# isort: off
from project.settings.web import *  # noqa: F403
from project.settings.tasks import *  # noqa: F403
from project.settings.workspaces import *  # noqa: F403
from project.settings.docker import *  # noqa: F403
from project.settings.proxy import *  # noqa: F403
from project.settings.observe import *  # noqa: F403
# isort: on

# The parts, in the order they run: the configuration reference reads its declarations from them.
PARTS = ("web", "tasks", "workspaces", "docker", "proxy", "observe")
