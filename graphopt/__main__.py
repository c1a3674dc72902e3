"""``python -m graphopt`` is the ``graphopt`` command."""

import sys

from graphopt.cli import main

sys.exit(main())
