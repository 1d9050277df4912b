"""``pvagent``: the guest agent daemon and its tracing tool.

pvagent run [--device PATH | --unix PATH] [--port-name NAME] [--config FILE]
pvagent trace PROGRAM [--json] [--loader libbpf|bcc]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from extpv.cli import die, setup_logging
from pvagent import bpfobj
from pvagent.agent import Agent, ProgramLimits
from pvagent.config import AgentConfig, load_config
from pvagent.cpuwatch import watch_cpus
from pvagent.errors import AgentError
from pvagent.loaders import load
from pvagent.memlock import lock_memory
from pvagent.mounts import ensure_tracing_mounts
from pvagent.topology import read_topology
from pvagent.trust import TrustPolicy
from pvproto import ProgramKind

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvagent",
        description="extpv guest agent: loads host-injected eBPF programs and streams "
        "their records to the host, whose services make sense of them.",
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
        "trace", help="load a program locally and print one line per ring-buffer record"
    )
    trace.add_argument(
        "program",
        help="a built program's name (e.g. affinity: affinity.bpf.o, or affinity.bcc.c "
        "with --loader bcc) or the path of an object or bcc source",
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


async def _with_cpus(agent: Agent, transport: Coroutine[Any, Any, None]) -> None:
    await asyncio.gather(transport, watch_cpus(agent))


async def _run(args: argparse.Namespace) -> None:
    from pvagent.port import run_device, run_port, run_unix  # noqa: PLC0415 - needs pyudev

    config = load_config(args.config)
    if (why := lock_memory()) is not None:  # see pvagent.memlock: pressure reports stay timely
        logging.getLogger("pvagent").warning("memory not locked: %s", why)
    agent = Agent(
        read_topology(),
        _policy(config),
        bcc_cache_dir=config.bcc_cache_dir,
        documents_dir=config.documents_dir,
        limits=ProgramLimits(config.max_programs, int(config.max_program_memory_mib * (1 << 20))),
        versions_file=config.state_dir / "versions.json" if config.state_dir else None,
    )
    if args.unix:
        transport = run_unix(agent, args.unix)
    elif args.device:
        transport = run_device(agent, args.device)
    else:
        transport = run_port(agent, args.port_name or config.port_name)
    # The guest's CPUs are followed beside the transport, across its connections (hot-plug).
    try:
        await _until_signalled(asyncio.ensure_future(_with_cpus(agent, transport)))
    finally:
        agent.close()


def _format(ringbuf: str, record: bytes, as_json: bool) -> str:
    """One record, undecoded: the agent knows no layout (the host's services do)."""
    if as_json:
        return json.dumps({"ringbuf": ringbuf, "size": len(record), "hex": record.hex()})
    return f"{ringbuf} {len(record):5d} {record.hex()}"


def _program_file(name: str, kind: ProgramKind) -> tuple[str, bytes]:
    """(program id, payload) of a built program's name or of a file's path."""
    if "/" in name or "." in name:
        path = Path(name)
        try:
            return path.name.split(".", 1)[0] or "trace", path.read_bytes()
        except OSError as err:
            raise AgentError(f"cannot read {path}: {err.strerror}") from err
    suffix = ".bpf.o" if kind == "bpf-object" else ".bcc.c"
    return name, bpfobj.read(name + suffix)


async def _trace(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    kind: ProgramKind = "bpf-object" if args.loader == "libbpf" else "bcc-source"
    program_id, payload = _program_file(args.program, kind)
    # A local operator's own built-in program: no signature, but the same allow-lists.
    policy = TrustPolicy(
        mode="any",
        allow=config.allow_attach,
        allow_kfuncs=config.allow_kfuncs,
        allow_pinning=config.allow_pinning,
    )
    policy.inspect(kind, payload)

    def sink(ringbuf: str, record: bytes) -> None:
        print(_format(ringbuf, record, args.json), flush=True)

    program = await asyncio.to_thread(
        load, program_id, kind, payload, sink, vet=policy.vet, bcc_cache_dir=config.bcc_cache_dir
    )
    loop = asyncio.get_running_loop()
    try:
        loop.add_reader(program.fileno(), program.consume)
        print(
            f"tracing {program_id} ({', '.join(program.attach_points)}) with {args.loader}; "
            "Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        await _until_signalled(asyncio.ensure_future(asyncio.Event().wait()))  # until a signal
    finally:
        loop.remove_reader(program.fileno())
        program.consume()
        program.close()
