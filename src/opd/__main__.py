"""``python -m opd ...`` is ``opd ...`` (and ``torchrun -m opd train ...``)."""

import sys

from opd.cli import main

sys.exit(main())
