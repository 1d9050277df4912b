"""What every extpv command line does the same way: user errors and log set-up."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

__all__ = ["LOG_FORMAT", "die", "setup_logging"]

#: Daemons log with a timestamp and the logger's name (``journalctl`` adds its own prefix).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def die(prog: str, message: str, hint: str | None = None) -> NoReturn:
    """Print ``prog: message`` (and ``hint: …``) on stderr and exit with status 1.

    For errors the user can fix; a bug should raise and show its traceback instead.
    """
    print(f"{prog}: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    raise SystemExit(1)


def setup_logging(verbosity: int = 0, *, fmt: str = LOG_FORMAT) -> None:
    """Log to stderr: INFO by default, DEBUG from ``verbosity`` ≥ 1."""
    logging.basicConfig(level=logging.DEBUG if verbosity > 0 else logging.INFO, format=fmt)
