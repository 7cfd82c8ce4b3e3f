"""``python -m r2sweep.cli``: the same as the ``r2sweep`` command."""

import sys

from r2sweep.cli.app import main

sys.exit(main())
