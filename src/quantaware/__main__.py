"""``python -m quantaware``: the command line (also ``torchrun -m quantaware qat ...``)."""

import sys

from quantaware.cli import main

sys.exit(main())
