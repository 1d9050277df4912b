"""``pvctl``: the operator's command line for the running host service."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from extpv.cli import die
from pvhost import signing
from pvhost.control import request
from pvhost.errors import HostError
from pvhost.libvirt import set_channel
from pvhost.placement import Finding
from pvhost.statusview import format_status
from vmlab.cli import register_cli as register_vm_cli

__all__ = ["main"]

DEFAULT_SOCKET = Path("/run/extpv/pvhost.sock")


def format_services(result: dict[str, Any]) -> str:
    """``pvctl service list``: every service found, then which runs in which VM."""
    lines = []
    for name, info in result["services"].items():
        mark = "default" if info["default"] else ""
        what = info["summary"] if info["usable"] else f"UNUSABLE: {info['error']}"
        lines.append(f"{name:<16} {mark:<8} {what}")
        lines.append(f"{'':<16} {'':<8} from {info['origin'] or 'nowhere'}")
        for other in info.get("shadowed", []):
            lines.append(f"{'':<16} {'':<8} ignored: another {name!r} from {other}")
    for vm, states in result["vms"].items():
        lines.append(f"VM {vm}: " + ", ".join(f"{s} {st}" for s, st in states.items()))
    return "\n".join(lines)


def report_verify(result: dict[str, Any]) -> None:
    """Print each drifted placement and exit 1 when any drifted; else say how many were checked."""
    findings = [Finding.model_validate(f) for f in result["findings"]]
    total = result["placements"]
    if not findings:
        print(f"{total} placement(s) verified")
        return
    for finding in findings:
        print(finding)
    drifted = len({(f.vm, f.vcpu) for f in findings})
    die(
        "pvctl",
        f"{drifted} of {total} placement(s) drifted from what pvhost applied",
        hint="`pvctl release VM` undoes what is left of a VM's placements; "
        "its guest's next request places it again",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvctl", description="Operate the extpv host service (pvhost) and its VMs."
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help=f"pvhost control socket (default {DEFAULT_SOCKET})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="VMs, vCPU threads, guest requests, placements")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    verify = sub.add_parser(
        "verify",
        help="re-check every placement against the kernel (exit status 1 when any drifted)",
        description="For every recorded pin: the vCPU thread is alive and in its cgroup, "
        "allowed exactly its pCPU, and the cgroup still holds the pin (v2: the partition is "
        "valid; v1: the cpuset holds the pCPU). Exit status 0 when all hold, 1 otherwise.",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    remap = sub.add_parser("remap", help="switch HT-aware remapping for a VM (the paper's switch)")
    remap.add_argument("state", choices=["on", "off"])
    remap.add_argument("vm")
    release = sub.add_parser("release", help="undo every placement of a VM now")
    release.add_argument("vm")
    program = sub.add_parser("program", help="inject or remove an eBPF program in a guest")
    program.add_argument("action", choices=["load", "unload"])
    program.add_argument("vm")
    program.add_argument(
        "file",
        help="compiled object (*.bpf.o) or bcc source (*.c); "
        "for unload, the file or the program id",
    )
    service = sub.add_parser(
        "service",
        help="paravirtual services (plugins): list them, enable or disable one for a VM",
        description="`list` shows every service pvhost found (built-in and `extpv.services` "
        "entry points) and its state in each VM; `enable`/`disable` switch one for a VM until "
        "pvhost restarts (the config's [services] enabled and [vms.NAME] services persist it).",
    )
    service_sub = service.add_subparsers(dest="action", required=True)
    service_list = service_sub.add_parser("list", help="services and where they run")
    service_list.add_argument("--json", action="store_true", help="machine-readable output")
    for action in ("enable", "disable"):
        switch = service_sub.add_parser(action, help=f"{action} a service for a VM")
        switch.add_argument("vm")
        switch.add_argument("service")
    keygen = sub.add_parser(
        "keygen",
        help="create the Ed25519 key pair pvhost signs programs with (signing.key, signing.pem)",
    )
    keygen.add_argument("dir", type=Path)
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    lv = sub.add_parser(
        "libvirt",
        help="turn extpv on or off for a libvirt domain (its channel; live when it runs)",
    )
    lv.add_argument("action", choices=["enable", "disable"])
    lv.add_argument("domain", help="the libvirt domain's name")
    lv.add_argument(
        "--uri", default="qemu:///system", help="libvirt connection URI (default qemu:///system)"
    )
    # `pvctl vm …` lives in the VM lab (vmlab): pvctl itself holds no VM code.
    register_vm_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "status":
            result = request(args.socket, {"cmd": "status"})
            print(json.dumps(result, indent=2) if args.json else format_status(result))
        elif args.command == "verify":
            result = request(args.socket, {"cmd": "verify"})
            if args.json:
                print(json.dumps(result, indent=2))
                return 1 if result["findings"] else 0
            report_verify(result)
        elif args.command == "remap":
            result = request(args.socket, {"cmd": "remap", "vm": args.vm, "on": args.state == "on"})
            print(f"VM {result['vm']}: remap {args.state}, policy {result['policy']}")
        elif args.command == "release":
            result = request(args.socket, {"cmd": "release", "vm": args.vm})
            print(f"VM {result['vm']}: released {result['released'] or 'nothing'}")
        elif args.command == "program":
            if args.action == "load":
                path = Path(args.file).resolve()
                result = request(
                    args.socket, {"cmd": "program-load", "vm": args.vm, "path": str(path)}
                )
                if not result["ok"]:
                    die(
                        "pvctl",
                        f"guest refused {result['program_id']}: {result['reason']}",
                        hint=result.get("log") or None,
                    )
                print(f"VM {args.vm}: program {result['program_id']} loaded")
            else:
                result = request(
                    args.socket, {"cmd": "program-unload", "vm": args.vm, "program": args.file}
                )
                print(f"VM {args.vm}: program {result['unloaded']} unloaded")
        elif args.command == "libvirt":
            print(set_channel(args.uri, args.domain, args.action == "enable"))
        elif args.command == "service":
            if args.action == "list":
                result = request(args.socket, {"cmd": "service-list"})
                print(json.dumps(result, indent=2) if args.json else format_services(result))
            else:
                cmd = {"cmd": f"service-{args.action}", "vm": args.vm, "service": args.service}
                result = request(args.socket, cmd)
                print(f"VM {result['vm']}: service {result['service']} {result['state']}"
                      f" (was {result['was']})")  # fmt: skip
        elif args.command == "keygen":
            return signing.keygen_command(args.dir, force=args.force)
        elif hasattr(args, "func"):
            rc: int = args.func(args)
            return rc
    except HostError as err:
        die("pvctl", str(err))
    except OSError as err:
        die("pvctl", f"{err.filename or ''}: {err.strerror}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
