"""``python -m cp_data``: the ``cp-data`` command."""

import sys

from cp_data.cli import main

sys.exit(main())
