"""``python -m quantaware.cli``."""

import sys

from quantaware.cli import main

sys.exit(main())
