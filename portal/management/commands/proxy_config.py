"""``python manage.py proxy_config``: print the proxy's starting configuration (Caddy JSON).

``bin/run`` starts Caddy with it: the admin API on ``PROXY_ADMIN`` and the workspaces server on
``PROXY_BIND`` with no route yet; the reconciler (beat, or ``manage.py reconcile``) and the
lifecycle put the routes in.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand

from provisioning.proxy import base_config


class Command(BaseCommand):
    help = "Print the reverse proxy's whole configuration (Caddy JSON), one for every workspace."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(json.dumps(base_config(), indent=2))
