"""``python -m rotaq.cli ...``: the ``rotaq`` command."""

import sys

from rotaq.cli import main

sys.exit(main())
