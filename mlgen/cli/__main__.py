"""``python -m mlgen.cli``: the ``mlgen`` command."""

import sys

from mlgen.cli import main

sys.exit(main())
