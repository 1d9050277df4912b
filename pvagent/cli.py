"""``pvagent``: the guest agent daemon and its tracing tool.

pvagent run [--device PATH | --unix PATH] [--port-name NAME] [--config FILE]
pvagent trace [--json] [--loader libbpf|bcc]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from extpv.cli import die, setup_logging
from pvagent import bpfobj
from pvagent.affinity_event import AffinityEvent, EventError, EventFlag, EventKind, decode
from pvagent.agent import AFFINITY_RINGBUF, Agent, ProgramLimits
from pvagent.config import AgentConfig, load_config
from pvagent.errors import AgentError
from pvagent.loaders import load
from pvagent.memlock import lock_memory
from pvagent.mounts import ensure_tracing_mounts
from pvagent.topology import read_topology
from pvagent.trust import TrustPolicy
from pvproto import ProgramKind, format_cpulist

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvagent",
        description="extpv guest agent: loads host-injected eBPF programs and reports "
        "the guest's CPU-affinity requests to the host.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the daemon: serve the host over the virtio-serial port")
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--device", type=Path, help="use this device/FIFO instead of finding the port"
    )
    where.add_argument(
        "--unix", type=Path, help="connect to this unix socket (tests, outside a VM)"
    )
    run.add_argument(
        "--port-name", help="virtio-serial port name (default from config: org.extpv.agent.0)"
    )
    run.add_argument(
        "--config", type=Path, help="configuration file (default /etc/pvagent/pvagent.toml)"
    )
    trace = sub.add_parser(
        "trace", help="load the built-in affinity program locally and print one line per event"
    )
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    trace.add_argument("--loader", choices=["libbpf", "bcc"], default="libbpf")
    trace.add_argument("--config", type=Path, help="configuration file (for bcc_cache_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The daemon logs INFO by default; trace's output is its events on stdout, so it logs only
    # warnings unless asked (-v: info, -vv: debug).
    setup_logging(args.verbose - (args.command == "trace"))
    if args.command == "trace" and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    if os.geteuid() != 0:
        die("pvagent", "loading eBPF programs needs root", hint="run it with sudo")
    try:
        ensure_tracing_mounts()
        if args.command == "run":
            asyncio.run(_run(args))
        else:
            asyncio.run(_trace(args))
    except AgentError as err:
        die("pvagent", str(err))
    except KeyboardInterrupt:
        return 130
    return 0


async def _until_signalled(work: asyncio.Future[object]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopper: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (work, stopper):
        task.cancel()
    if work in done:
        work.result()


def _policy(config: AgentConfig) -> TrustPolicy:
    return TrustPolicy.from_config(
        config.trusted_dir,
        config.trust,
        config.allow_attach,
        allow_kfuncs=config.allow_kfuncs,
        allow_pinning=config.allow_pinning,
    )


async def _run(args: argparse.Namespace) -> None:
    from pvagent.port import run_device, run_port, run_unix  # noqa: PLC0415 - needs pyudev

    config = load_config(args.config)
    if (why := lock_memory()) is not None:  # see pvagent.memlock: pressure reports stay timely
        logging.getLogger("pvagent").warning("memory not locked: %s", why)
    agent = Agent(
        read_topology(),
        _policy(config),
        coalesce_s=config.coalesce_ms / 1000,
        bcc_cache_dir=config.bcc_cache_dir,
        placement_file=config.placement_file,
        limits=ProgramLimits(config.max_programs, int(config.max_program_memory_mib * (1 << 20))),
        versions_file=config.state_dir / "versions.json" if config.state_dir else None,
    )
    if args.unix:
        work = run_unix(agent, args.unix)
    elif args.device:
        work = run_device(agent, args.device)
    else:
        work = run_port(agent, args.port_name or config.port_name)
    try:
        await _until_signalled(asyncio.ensure_future(work))
    finally:
        agent.close()


def _format(event: AffinityEvent, as_json: bool) -> str:
    inherited = EventFlag.INHERITED in event.flags
    name = "exit" if event.kind is EventKind.EXIT else "inherit" if inherited else "setaffinity"
    if as_json:
        record: dict[str, object] = {
            "event": name,
            "tgid": event.tgid,
            "tid": event.tid,
            "ktime_ns": event.ktime_ns,
        }
        if event.kind is EventKind.SET:
            record |= {"target_tid": event.target_tid, "cpus": sorted(event.cpus)}
        if event.flags & ~EventFlag.INHERITED:
            record["flags"] = str(event.flags & ~EventFlag.INHERITED)
        return json.dumps(record)
    if event.kind is EventKind.EXIT:
        return f"EXIT        tgid={event.tgid} tid={event.tid}"
    return (
        f"{name.upper():<11} tgid={event.tgid} tid={event.tid} target={event.target_tid} "
        f"cpus={format_cpulist(event.cpus)}"
    )


async def _trace(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    kind: ProgramKind = "bpf-object" if args.loader == "libbpf" else "bcc-source"
    name = "affinity.bpf.o" if kind == "bpf-object" else "affinity.bcc.c"
    payload = bpfobj.read(name)
    # A local operator's own built-in program: no signature, but the same allow-lists.
    policy = TrustPolicy(
        mode="any",
        allow=config.allow_attach,
        allow_kfuncs=config.allow_kfuncs,
        allow_pinning=config.allow_pinning,
    )
    policy.inspect(kind, payload)

    def sink(ringbuf: str, record: bytes) -> None:
        if ringbuf != AFFINITY_RINGBUF:
            return
        try:
            line = _format(decode(record), args.json)
        except EventError as err:
            line = f"bad event: {err}"
        print(line, flush=True)

    program = await asyncio.to_thread(
        load, "affinity", kind, payload, sink, vet=policy.vet, bcc_cache_dir=config.bcc_cache_dir
    )
    loop = asyncio.get_running_loop()
    try:
        loop.add_reader(program.fileno(), program.consume)
        print(
            f"tracing sched_setaffinity with {args.loader}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        await _until_signalled(asyncio.ensure_future(asyncio.Event().wait()))  # until a signal
    finally:
        loop.remove_reader(program.fileno())
        program.consume()
        program.close()
