"""`python -m dsv3.bench <family> [options]`."""

import sys

from . import run

sys.exit(run(sys.argv[1:]))
