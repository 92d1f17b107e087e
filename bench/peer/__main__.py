"""``python -m bench.peer``: the same as ``python -m bench peer``."""

import sys

from bench.peer import main

sys.exit(main())
