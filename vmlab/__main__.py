"""``python -m vmlab vm start|stop|list|console``."""

import sys

from vmlab.cli import main

sys.exit(main())
