"""``pvhost``: the host service's command line."""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
from pathlib import Path

from extpv.cli import die, setup_logging
from pvhost.config import DEFAULT_CONFIG_PATH, load_config
from pvhost.daemon import run_daemon, set_priority
from pvhost.errors import HostError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pvhost",
        description="extpv host service: turns guest affinity requests into isolated placements.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon (as root)")
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML config file (default {DEFAULT_CONFIG_PATH} if present)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    setup_logging(int(args.verbose))
    # Two sockets per VM: raise the soft descriptor limit to the hard one.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        config = load_config(args.config)
        set_priority(config.service.nice)
        asyncio.run(run_daemon(config))
    except HostError as err:
        die("pvhost", str(err), hint="see `pvhost run --help` and docs/interfaces.md")
    except PermissionError as err:
        die("pvhost", f"permission denied: {err}", hint="pvhost needs root (cgroupfs, /run/extpv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
