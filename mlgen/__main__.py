"""``python -m mlgen``: the ``mlgen`` command."""

import sys

from mlgen.cli import main

sys.exit(main())
