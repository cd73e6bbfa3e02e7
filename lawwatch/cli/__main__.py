"""``python -m lawwatch.cli``: the ``lawwatch`` command."""

import sys

from lawwatch.cli import main

sys.exit(main())
