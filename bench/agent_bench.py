#!/usr/bin/env python3
"""Guest-agent micro-benchmarks (root; real eBPF in the running kernel). ~1 minute.

Measures, for each loader (libbpf CO-RE object, bcc source):

* **load time**: open + verify + attach (+ compile for bcc), median of several loads;
* **syscall → agent latency**: from the BPF program's timestamp at ``sys_enter`` of a
  ``sched_setaffinity`` call in another process, to (a) the event reaching the agent's
  asyncio loop through the epoll fd, and (b) the tracker publishing the AffinityUpdate
  (a request every 25 ms, longer than the 20 ms coalescing window);
* **agent CPU**: the real ``pvagent run --unix`` daemon (protocol 4: it forwards the records,
  the host decodes and tracks them), connected to a host played by this script (the host's
  decoder and tracker, as pvhost's affinity service runs them), idle and during a 100 000
  calls/s storm of distinct masks (every call an event), plus its RSS before/after and how
  long after the storm's last call the host's tracker holds the final state.

Writes bench/results/agent.json and bench/results/agent.md.

    sudo .venv/bin/python bench/agent_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exp_stats import percentile

from pvagent import bpfobj
from pvagent.loaders import load
from pvagent.program import ProgramKind
from pvagent.trust import TrustPolicy
from pvhost.services.affinity_event import decode
from pvhost.services.affinity_tracker import AffinityTracker
from pvproto import (
    SUPPORTED_VERSIONS,
    AffinityUpdate,
    FrameDecoder,
    Hello,
    LoadProgram,
    ProgramLoaded,
    ProgramRecords,
    encode,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KINDS: dict[str, ProgramKind] = {"libbpf": "bpf-object", "bcc": "bcc-source"}
PAYLOAD = {"bpf-object": "affinity.bpf.o", "bcc-source": "affinity.bcc.c"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
VET = TrustPolicy(mode="any").vet  # the built-in programs, judged like the agent does

# Paced sched_setaffinity generator, run as a separate process: alternates {first CPU}
# (a request) and every CPU (its release), so every call is an event AND a change of the
# wanted set; ends pinned to {last CPU}, prints its tid and the time of that last call.
GENERATOR = r"""
import os, sys, threading, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
cpus = sorted(os.sched_getaffinity(0))
masks = ({cpus[0]}, set(cpus))
n, start = 0, time.monotonic()
print("ready", flush=True)
while (now := time.monotonic()) < start + seconds:
    due = int((now - start) * rate)
    while n < due:
        os.sched_setaffinity(0, masks[n & 1])
        n += 1
    time.sleep(0.0005 if rate > 1000 else 1 / rate / 4)
os.sched_setaffinity(0, {cpus[-1]})
print(os.getpid(), threading.get_native_id(), n, time.monotonic_ns(), flush=True)
sys.stdin.read()
"""


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_load(kind: ProgramKind, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        program = load("bench", kind, bpfobj.read(PAYLOAD[kind]), lambda _n, _r: None, vet=VET)
        times.append(program.load_seconds * 1000)
        program.close()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": repeat}


async def bench_latency(kind: ProgramKind, rate: float, seconds: float) -> dict[str, float]:
    event_lat: list[float] = []
    publish_lat: list[float] = []
    last_ktime = [0]
    gen_pid = [0]

    def published(_update: AffinityUpdate) -> None:
        if last_ktime[0]:
            publish_lat.append((time.monotonic_ns() - last_ktime[0]) / 1000)

    cpus = sorted(os.sched_getaffinity(0))
    tracker = AffinityTracker(cpus, published, window=0.020)

    def sink(_name: str, record: bytes) -> None:
        now = time.monotonic_ns()
        event = decode(record)
        if event.tgid != gen_pid[0]:
            return  # another process on this machine
        event_lat.append((now - event.ktime_ns) / 1000)
        last_ktime[0] = event.ktime_ns
        tracker.handle(event)

    program = load("bench", kind, bpfobj.read(PAYLOAD[kind]), sink, vet=VET)
    loop = asyncio.get_running_loop()
    loop.add_reader(program.fileno(), program.consume)
    gen = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GENERATOR, str(rate), str(seconds),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    gen_pid[0] = gen.pid
    assert gen.stdout is not None and gen.stdin is not None
    await gen.stdout.readline()
    await asyncio.wait_for(gen.stdout.readline(), seconds + 10)
    await asyncio.sleep(0.1)
    gen.stdin.close()
    await gen.wait()
    loop.remove_reader(program.fileno())
    program.close()
    tracker.close()
    return {
        "calls_per_s": rate,
        "events": len(event_lat),
        "event_p50_us": percentile(event_lat, 50),
        "event_p99_us": percentile(event_lat, 99),
        "update_p50_us": percentile(publish_lat, 50),
        "update_p99_us": percentile(publish_lat, 99),
        "updates": len(publish_lat),
    }


class Host:
    """The host side of one agent connection (what pvhost does, reduced to the bench's needs)."""

    def __init__(self) -> None:
        self.connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )
        self.decoder = FrameDecoder()
        self.updates: list[tuple[int, AffinityUpdate]] = []
        #: What pvhost's affinity service does with the agent's records (protocol 4).
        self.tracker = AffinityTracker(
            sorted(os.sched_getaffinity(0)),
            lambda update: self.updates.append((time.monotonic_ns(), update)),
            window=0.020,
        )

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.connected.done():
            self.connected.set_result((reader, writer))

    async def next_message(
        self, reader: asyncio.StreamReader, kind: type, timeout: float
    ) -> object:
        deadline = time.monotonic() + timeout
        pending: list[object] = []
        while True:
            for item in pending:
                if isinstance(item, ProgramRecords) and item.ringbuf == "pv_affinity":
                    for record in item.records:
                        self.tracker.handle(decode(record))
                if isinstance(item, kind):
                    return item
            pending = self.decoder.feed(
                await asyncio.wait_for(reader.read(1 << 16), deadline - time.monotonic())
            )


async def bench_agent(
    kind: ProgramKind, idle_s: float, storm_s: float, rate: float
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "agent.sock"
        config = Path(tmp) / "pvagent.toml"
        config.write_text(f'trust = "any"\nbcc_cache_dir = "{tmp}/cache"\n')
        host = Host()
        server = await asyncio.start_unix_server(host.on_connect, str(sock))
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvagent", "run", "--unix", str(sock), "--config", str(config),
            stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        try:
            reader, writer = await asyncio.wait_for(host.connected, 30)
            await host.next_message(reader, Hello, 10)
            writer.write(
                encode(
                    Hello(
                        role="host",
                        protocol_versions=list(SUPPORTED_VERSIONS),
                        software_version="bench",
                    )
                )
            )
            payload = bpfobj.read(PAYLOAD[kind])
            writer.write(encode(LoadProgram.for_payload("affinity", kind, payload, request_id=1)))
            verdict = await host.next_message(reader, ProgramLoaded, 30)
            assert isinstance(verdict, ProgramLoaded) and verdict.ok, verdict

            async def drain_for(seconds: float) -> None:
                end = time.monotonic() + seconds
                while (left := end - time.monotonic()) > 0:
                    try:
                        await host.next_message(reader, type(None), left)
                    except TimeoutError:
                        return

            await drain_for(0.5)
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            await drain_for(idle_s)
            idle = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
            rss_before = rss_kib(agent.pid)
            gen = await asyncio.create_subprocess_exec(
                sys.executable, "-c", GENERATOR, str(rate), str(storm_s),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            assert gen.stdout is not None and gen.stdin is not None
            await gen.stdout.readline()
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            split0 = cpu_split(agent.pid)
            updates_before = len(host.updates)
            line_task = asyncio.ensure_future(gen.stdout.readline())
            while not line_task.done():
                with contextlib.suppress(TimeoutError):
                    await host.next_message(reader, type(None), 0.2)
            storm_cpu = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
            split1 = cpu_split(agent.pid)
            storm_sys_share = (split1[1] - split0[1]) / max(1e-9, sum(split1) - sum(split0))
            _pid, gen_tid, calls, last_call_ns = map(int, line_task.result().split())
            final_cpu = sorted(os.sched_getaffinity(0))[-1]
            final_latency_ms = None
            deadline = time.monotonic() + 10
            while final_latency_ms is None and time.monotonic() < deadline:
                for stamp, update in host.updates[updates_before:]:
                    if any(t.tid == gen_tid and t.vcpus == [final_cpu] for t in update.threads):
                        final_latency_ms = (stamp - last_call_ns) / 1e6
                        break
                else:
                    with contextlib.suppress(TimeoutError):
                        await host.next_message(reader, type(None), 0.2)
            rss_after = rss_kib(agent.pid)
            gen.stdin.close()
            await gen.wait()
            return {
                "load_ok": verdict.ok,
                "idle_cpu_percent": idle * 100,
                "storm_calls": calls,
                "storm_calls_per_s": calls / storm_s,
                "storm_cpu_percent": storm_cpu * 100,
                "storm_cpu_system_share": storm_sys_share,
                "storm_updates_received": len(host.updates) - updates_before,
                "final_state_after_last_call_ms": final_latency_ms,
                "rss_kib_before_storm": rss_before,
                "rss_kib_after_storm": rss_after,
            }
        finally:
            agent.terminate()
            await agent.wait()
            server.close()


def write_results(results: dict[str, object]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Guest agent benchmarks",
        "",
        f"Recorded {results['date']} on {results['machine']} (kernel {results['kernel']}), "
        "by `sudo .venv/bin/python bench/agent_bench.py`. Raw numbers: `agent.json`.",
        "",
        "| loader | load (median) | event p50 / p99 | AffinityUpdate p50 / p99 "
        "| agent CPU idle | agent CPU, 100k/s storm | final state after storm "
        "| RSS before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines[2] += f" Load average when it started: {results['loadavg_at_start']:.2f}."
    for name in KINDS:
        r = results[name]
        assert isinstance(r, dict)
        lat, agent = r["latency"], r["agent"]
        lines.append(
            f"| {name} | {r['load']['median_ms']:.1f} ms | {lat['event_p50_us']:.0f} / "
            f"{lat['event_p99_us']:.0f} µs | {lat['update_p50_us']:.0f} / "
            f"{lat['update_p99_us']:.0f} µs | {agent['idle_cpu_percent']:.2f} % "
            f"| {agent['storm_cpu_percent']:.1f} % ({agent['storm_cpu_system_share']:.0%} in the "
            f"kernel; {agent['storm_calls_per_s']:.0f} calls/s) "
            f"| {agent['final_state_after_last_call_ms']:.1f} ms "
            f"| {agent['rss_kib_before_storm']} → {agent['rss_kib_after_storm']} KiB |"
        )
    lines += [
        "",
        "* *event*: BPF timestamp at `sys_enter_sched_setaffinity` (another process) → record",
        "  delivered in the agent's asyncio loop via the ring buffer's epoll fd.",
        "* *AffinityUpdate*: same start → the tracker publishes the new state (one request per",
        "  25 ms, longer than the 20 ms coalescing window, so no coalescing delay).",
        "* *storm*: one thread alternating {CPU 0} and all CPUs at 100 000 calls/s (each call",
        "  an event and a change of the wanted set, coalesced to one update per 20 ms window),",
        "  then a final pin; *final state* is the time from that last call to the host",
        "  receiving the AffinityUpdate that holds it (bound: one window + delivery).",
        "* Machine shared with other jobs (2 vCPUs): percentiles include scheduling noise.",
    ]
    (RESULTS / "agent.md").write_text("\n".join(lines) + "\n")


async def main_async(quick: bool) -> dict[str, object]:
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg()[0],
    }
    for name, kind in KINDS.items():
        print(f"[{name}] load times", file=sys.stderr)
        entry: dict[str, object] = {"load": bench_load(kind, 5 if kind == "bpf-object" else 3)}
        print(f"[{name}] latency", file=sys.stderr)
        entry["latency"] = await bench_latency(kind, 40.0, 3.0 if quick else 6.0)
        print(f"[{name}] agent CPU idle / storm", file=sys.stderr)
        entry["agent"] = await bench_agent(
            kind, 3.0 if quick else 5.0, 3.0 if quick else 5.0, 100_000.0
        )
        results[name] = entry
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("agent_bench: needs root (eBPF)", file=sys.stderr)
        return 1
    results = asyncio.run(main_async(args.quick))
    write_results(results)
    print((RESULTS / "agent.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
