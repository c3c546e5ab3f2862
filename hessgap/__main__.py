"""``python -m hessgap``: the same as the ``hessgap`` command."""

import sys

from .cli import main

sys.exit(main())
