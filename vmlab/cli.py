"""``vm start|stop|list|console``: for ``pvctl vm …`` and ``python -m vmlab vm …``.

pvctl owns no VM code: it calls :func:`register_cli` on its subparsers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from extpv.cli import die, setup_logging
from extpv.names import VM_NAME_MAX
from vmlab.console import attach_console
from vmlab.errors import ImageError, LauncherError
from vmlab.kvm import ACCELERATORS
from vmlab.machine import list_vms, start, stop
from vmlab.qemu import DEFAULT_RUNTIME_DIR, NICE_MAX, NICE_MIN, VMSpec

__all__ = ["main", "register_cli", "run_cli"]

#: Errors name this program (pvctl's or ``python -m vmlab``'s usage is the same).
PROG = "pvctl vm"


def _cmd_start(args: argparse.Namespace) -> None:
    spec = VMSpec(
        name=args.name,
        image=Path(args.image),
        smp=args.smp,
        memory_mib=args.memory,
        runtime_dir=Path(args.runtime_dir),
        accel=args.accel,
        virtfs=tuple((Path(p), t) for p, t in (v.split(":", 1) for v in args.virtfs)),
        test_hook=args.test_hook,
        nice=args.nice,
    )
    vm = start(spec, wait=not args.no_wait, deadline_s=args.timeout)
    print(
        json.dumps(
            {
                "name": vm.name,
                "pid": vm.pid,
                "accel": vm.accel,
                "nice": vm.spec.nice,
                "dir": str(vm.dir),
            }
        )
    )


def _cmd_stop(args: argparse.Namespace) -> None:
    stop(args.name, Path(args.runtime_dir))


def _cmd_list(args: argparse.Namespace) -> None:
    vms = list_vms(Path(args.runtime_dir))
    if args.json:
        print(json.dumps(vms, indent=2))
        return
    for v in vms:
        state = "running" if v["alive"] else "dead"
        print(f"{v['name']:16} {state:8} pid {v['pid']:<8} smp {v['smp']:<3} ", end="")
        nice = "" if v["nice"] is None else f"nice {v['nice']} "
        print(f"{v['accel']:4} {nice}{v['image'] or '(empty machine)'}")


def _cmd_console(args: argparse.Namespace) -> None:
    attach_console(args.name, Path(args.runtime_dir))


def _virtfs(value: str) -> str:
    if ":" not in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOSTDIR:TAG")
    return value


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``vm start|stop|list|console`` to a CLI's argparse subparsers (pvctl does)."""
    vm = subparsers.add_parser(
        "vm",
        help="start, stop and list QEMU guests wired to pvhost",
        description="Start, stop and list extpv QEMU guests (the VM lab, package vmlab).",
    )
    vm.add_argument(
        "--runtime-dir",
        default=str(DEFAULT_RUNTIME_DIR),
        help="where VM directories live; pvhost watches it (default %(default)s)",
    )
    sub = vm.add_subparsers(dest="vm_command", required=True)
    p = sub.add_parser("start", help="boot a guest image")
    p.add_argument(
        "name",
        help=f"VM name: 1 to {VM_NAME_MAX} letters, digits, '.', '_', '-' "
        "(starting with a letter or digit)",
    )
    p.add_argument("--image", required=True, help="image directory from images/build-image")
    p.add_argument("--smp", type=int, default=2, help="vCPUs (default %(default)s)")
    p.add_argument("--memory", type=int, default=1024, help="MiB (default %(default)s)")
    p.add_argument(
        "--accel",
        choices=ACCELERATORS,
        default="auto",
        help="auto: KVM when it really runs guests here, else TCG",
    )
    p.add_argument(
        "--virtfs",
        action="append",
        type=_virtfs,
        default=[],
        metavar="HOSTDIR:TAG",
        help="share a host directory over 9p (mount -t 9p TAG in the guest)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=None,
        metavar="N",
        help=f"run every QEMU thread at nice N ({NICE_MIN}..{NICE_MAX}; below 0 needs root): "
        "the guest's priority against other host load. On a loaded host a guest at the load's "
        "priority is starved, and so are its pins' round trips (docs/vm-priority.md). "
        "Default: the launcher's own nice",
    )
    p.add_argument(
        "--test-hook", action="store_true", help="serve the test images' command hook on test.sock"
    )
    p.add_argument("--no-wait", action="store_true", help="return once QEMU runs")
    p.add_argument("--timeout", type=float, default=240.0, help="boot deadline, s")
    p.set_defaults(vm_func=_cmd_start)
    p = sub.add_parser("stop", help="end a guest (QMP quit, then signals)")
    p.add_argument("name")
    p.set_defaults(vm_func=_cmd_stop)
    p = sub.add_parser("list", help="list guests")
    p.add_argument("--json", action="store_true")
    p.set_defaults(vm_func=_cmd_list)
    p = sub.add_parser("console", help="attach to a guest's serial console (Ctrl-] detaches)")
    p.add_argument("name")
    p.set_defaults(vm_func=_cmd_console)
    vm.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed ``vm`` command; an error is one clear message and SystemExit(1)."""
    try:
        args.vm_func(args)
    except ImageError as err:
        die(PROG, str(err), "build an image: sudo images/build-image")
    except LauncherError as err:
        die(PROG, str(err))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmlab vm …`` (the same commands as ``pvctl vm …``)."""
    parser = argparse.ArgumentParser(prog="python -m vmlab", description="extpv's VM lab")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    setup_logging(fmt="%(message)s")
    return run_cli(args)
