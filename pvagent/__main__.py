"""``python -m pvagent`` is ``pvagent``."""

import sys

from pvagent.cli import main

sys.exit(main())
