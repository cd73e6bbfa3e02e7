"""``python -m lawwatch``: the ``lawwatch`` command (``torchrun -m lawwatch analyze …``)."""

import sys

from lawwatch.cli import main

sys.exit(main())
