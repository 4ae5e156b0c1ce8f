"""`python -m optserve.server.cli ...`: the same as the `optserve` command."""

import sys

from optserve.server.cli import main

sys.exit(main())
