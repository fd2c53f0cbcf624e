"""``python -m rotaq ...`` (and ``torchrun ... -m rotaq ...``): the ``rotaq`` command."""

import sys

from rotaq.cli import main

sys.exit(main())
