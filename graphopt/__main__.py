"""``python -m graphopt`` is the ``graphopt`` command."""

import sys

from graphopt.launch import main

sys.exit(main())
