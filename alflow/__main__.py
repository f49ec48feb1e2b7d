"""``python -m alflow``: the command-line interface."""

import sys

from alflow.cli import main

sys.exit(main())
