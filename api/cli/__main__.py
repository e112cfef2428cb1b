"""`python -m api.cli ...`: the same command as `fourfold ...` (how `fourfold up --detach` starts the service)."""

import sys

from api.cli import main

sys.exit(main())
