"""Host service micro-benchmarks → bench/results/host.md (+ host.json).

1. Backend apply/undo latency: ``pin`` and ``unpin`` of a real thread through the placement
   backend this host supports (cgroup v1 here; run inside the VM harness for cgroup v2).
2. Round trip: AffinityUpdate → AffinityResult through the whole service, with a real QEMU
   (TCG, ``-S``) and its real vCPU thread, the guest played on the channel socket (as an
   agent of protocol 3, which sends the AffinityUpdate itself; a generic agent's updates come
   from pvhost's own tracker and enter the same placement path).
3. Memory: RSS of ``pvhost run`` serving 256 simulated VMs. The VMs are load generators: a
   minimal QMP responder (greeting, ``qmp_capabilities``, ``query-cpus-fast``) and a guest
   peer per VM that says Hello (protocol 3), answers LoadProgram and sends AffinityUpdates.

Run as root: ``.venv/bin/python bench/host_placement.py [--iterations N] [--vms N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exp_stats import latency_summary  # noqa: E402

from pvhost.config import Config  # noqa: E402
from pvhost.placement import detect_backend  # noqa: E402
from pvhost.service import Service  # noqa: E402
from pvproto import (  # noqa: E402
    AffinityResult,
    AffinityUpdate,
    FrameDecoder,
    GuestTopology,
    Hello,
    LoadProgram,
    ProgramLoaded,
    encode,
)
from vmlab import VMSpec, start  # noqa: E402
from vmlab.guestpeer import TRACKING_AGENT_VERSIONS, FakeGuestChannel  # noqa: E402


def bench_backend(iterations: int, tmp: Path) -> dict[str, object]:
    # cgroup v1: move mode, as bench/results/host-cgroup1.md was recorded (resident mode's
    # pin, pvhost's default: bench/cgroup1_attach.py, bench/vm_stages.py).
    backend = detect_backend(
        Path("/sys/fs/cgroup"), tmp / "state", group="extpv-bench", cgroup1_mode="move"
    )
    cpus = sorted(os.sched_getaffinity(0))
    backend.setup(frozenset(cpus))
    stop = threading.Event()
    tids: list[int] = []
    worker = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), stop.wait()))
    worker.start()
    while not tids:
        time.sleep(0.001)
    pins: list[float] = []
    unpins: list[float] = []
    try:
        backend.attach("bench", os.getpid(), {0: tids[0]})
        for i in range(iterations):
            pcpu = cpus[i % len(cpus)]
            t0 = time.perf_counter()
            backend.pin("bench", 0, tids[0], pcpu)
            t1 = time.perf_counter()
            backend.unpin("bench", 0)
            t2 = time.perf_counter()
            pins.append(t1 - t0)
            unpins.append(t2 - t1)
    finally:
        backend.detach("bench")
        backend.teardown()
        stop.set()
        worker.join()
    return {"backend": backend.name, "pin": latency_summary(pins), "unpin": latency_summary(unpins)}


def bench_round_trip(iterations: int, tmp: Path) -> dict[str, object]:
    qemu = start(VMSpec.empty("bench", tmp / "vm"))
    program = tmp / "affinity.bpf.o"
    program.write_bytes(b"\x7fELF bench payload")
    config = Config.model_validate({
        "service": {"runtime_dir": str(tmp / "runtime"), "state_dir": str(tmp / "rt-state"),
                    "signing_key": str(tmp / "none"), "affinity_program": str(program)},
        "placement": {"group": "extpv-bench-rt", "housekeeping": "", "policy": "identity",
                      "rate": 10000, "burst": 10000},
        "vms": {"bench": {"qmp": str(qemu.qmp_socket), "agent": str(qemu.agent_socket)}},
    })  # fmt: skip

    async def run() -> tuple[list[float], list[float]]:
        guest = FakeGuestChannel(qemu.dir / "agent.sock")
        await guest.start()
        service = Service(config)
        await service.start()
        pin, unpin = [], []
        try:
            await guest.connected()
            seq = 0
            for _ in range(iterations):
                seq += 1
                t0 = time.perf_counter()
                await guest.update(seq, [1])
                t1 = time.perf_counter()
                seq += 1
                await guest.update(seq, [])
                t2 = time.perf_counter()
                pin.append(t1 - t0)
                unpin.append(t2 - t1)
        finally:
            await service.stop()
            await guest.close()
        return pin, unpin

    try:
        pin, unpin = asyncio.run(run())
    finally:
        qemu.stop()
    return {"pin_update": latency_summary(pin), "unpin_update": latency_summary(unpin)}


# -- 256 simulated VMs ---------------------------------------------------------------------------
async def fake_qmp(path: Path, tid: int) -> asyncio.Server:
    greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
                                    "package": "bench"}, "capabilities": []}}  # fmt: skip
    cpus = [{"cpu-index": i, "thread-id": tid, "qom-path": f"/machine/unattached/device[{i}]",
             "target": "x86_64", "props": {"socket-id": 0, "core-id": i, "thread-id": 0}}
            for i in range(2)]  # fmt: skip

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        decoder, buf = json.JSONDecoder(), ""
        while chunk := await reader.read(65536):
            buf += chunk.decode()  # QMP commands are not newline-terminated: parse a stream
            while buf.strip():
                try:
                    req, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                ret: object = cpus if req.get("execute") == "query-cpus-fast" else {}
                writer.write(json.dumps({"return": ret, "id": req.get("id")}).encode() + b"\r\n")
            await writer.drain()

    return await asyncio.start_unix_server(serve, str(path))


async def fake_guest(path: Path, updates: int, done: asyncio.Queue[int]) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = Hello(role="guest", protocol_versions=list(TRACKING_AGENT_VERSIONS),
                      software_version="sim",
                      topology=GuestTopology(online_vcpus=[0, 1]))  # fmt: skip
        writer.write(encode(hello))
        decoder = FrameDecoder()
        answered = 0
        for seq in range(updates):
            writer.write(encode(AffinityUpdate(seq=seq, wanted=[])))
        while chunk := await reader.read(65536):
            for item in decoder.feed(chunk):
                if isinstance(item, LoadProgram):
                    writer.write(encode(ProgramLoaded(program_id=item.program_id, ok=True,
                                                      request_id=item.request_id)))  # fmt: skip
                elif isinstance(item, AffinityResult):
                    answered += 1
                    if item.seq == updates - 1:
                        await done.put(answered)

    return await asyncio.start_unix_server(serve, str(path))


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def bench_memory(vms: int, tmp: Path) -> dict[str, object]:
    runtime = tmp / "runtime"
    program = tmp / "affinity.bpf.o"
    program.write_bytes(b"\x7fELF" + bytes(16 * 1024))
    config = tmp / "pvhost.toml"
    config.write_text(
        f'[service]\nruntime_dir = "{runtime}"\nstate_dir = "{tmp / "mem-state"}"\n'
        f'control_socket = "{tmp / "pvhost.sock"}"\nmetrics = ""\n'
        f'signing_key = "{tmp / "none"}"\naffinity_program = "{program}"\n'
        f'[placement]\ngroup = "extpv-bench-mem"\nhousekeeping = ""\n'
    )

    async def run() -> dict[str, object]:
        done: asyncio.Queue[int] = asyncio.Queue()
        servers = []
        for i in range(vms):
            d = runtime / f"sim{i:03d}"
            d.mkdir(parents=True)
            servers.append(await fake_qmp(d / "qmp.sock", os.getpid()))
            servers.append(await fake_guest(d / "agent.sock", 3, done))
        base = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import pvhost.service, time; time.sleep(30)",
        )  # fmt: skip
        await asyncio.sleep(3)
        baseline = rss_kib(base.pid)
        base.kill()
        await base.wait()
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvhost.cli", "run", "--config", str(config),
            stderr=None if os.environ.get("BENCH_DEBUG") else asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with asyncio.timeout(float(os.environ.get("BENCH_TIMEOUT", "120"))):
                for _ in range(vms):
                    await done.get()
            ready_s = time.perf_counter() - t0
            await asyncio.sleep(1)
            mem = rss_kib(proc.pid)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
            for s in servers:
                s.close()
        return {"vms": vms, "all_answered_after_s": round(ready_s, 2),
                "rss_kib": mem["VmRSS"], "peak_rss_kib": mem["VmHWM"],
                "interpreter_with_imports_rss_kib": baseline["VmRSS"],
                "per_vm_kib": round((mem["VmRSS"] - baseline["VmRSS"]) / vms, 1)}  # fmt: skip

    return asyncio.run(run())


def write_backend_only(args: argparse.Namespace, backend: dict[str, object]) -> int:
    name = f"host-{backend['backend']}"
    result = {
        "machine": f"{platform.node()} {platform.release()}, {os.cpu_count()} CPUs",
        "note": args.note,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "backend": backend,
    }
    b: Any = backend
    md = f"""# Host service: placement latency ({backend["backend"]})

Machine: {result["machine"]}; {result["date"]}. {args.note}
Command: `bench/host_placement.py --backend-only` (raw numbers: `{name}.json`).

| what | n | p50 ms | p99 ms | mean ms |
|---|---|---|---|---|
| backend pin (apply + read-back + verify) | {b["pin"]["n"]} | {b["pin"]["p50_ms"]} | {b["pin"]["p99_ms"]} | {b["pin"]["mean_ms"]} |
| backend unpin (exact undo) | {b["unpin"]["n"]} | {b["unpin"]["p50_ms"]} | {b["unpin"]["p99_ms"]} | {b["unpin"]["mean_ms"]} |
"""  # noqa: E501
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(md)
    print(md)
    print("JSON", json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--vms", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument(
        "--backend-only",
        action="store_true",
        help="only the backend latency (inside the VM harness, where there is no QEMU)",
    )
    parser.add_argument("--note", default="", help="where and how this was measured")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 servers + 2 peers per VM
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        backend = bench_backend(args.iterations, tmp)
        if args.backend_only:
            return write_backend_only(args, backend)
        round_trip = bench_round_trip(max(args.iterations // 4, 10), tmp)
        memory = bench_memory(args.vms, tmp)
    result = {
        "machine": f"{platform.node()} {platform.release()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "backend": backend,
        "round_trip": round_trip,
        "memory": memory,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"host-{backend['backend']}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    b, rt, m = backend, round_trip, memory
    md = f"""# Host service: placement latency and memory ({backend["backend"]})

Machine: {result["machine"]}; {result["date"]}. Command: `.venv/bin/python bench/host_placement.py`
(raw numbers: `{name}.json`).

| what | n | p50 ms | p99 ms | mean ms |
|---|---|---|---|---|
| backend pin (apply + verify) | {b["pin"]["n"]} | {b["pin"]["p50_ms"]} | {b["pin"]["p99_ms"]} | {b["pin"]["mean_ms"]} |
| backend unpin (exact undo) | {b["unpin"]["n"]} | {b["unpin"]["p50_ms"]} | {b["unpin"]["p99_ms"]} | {b["unpin"]["mean_ms"]} |
| AffinityUpdate [1] → AffinityResult (real QEMU thread) | {rt["pin_update"]["n"]} | {rt["pin_update"]["p50_ms"]} | {rt["pin_update"]["p99_ms"]} | {rt["pin_update"]["mean_ms"]} |
| AffinityUpdate [] → AffinityResult (undo) | {rt["unpin_update"]["n"]} | {rt["unpin_update"]["p50_ms"]} | {rt["unpin_update"]["p99_ms"]} | {rt["unpin_update"]["mean_ms"]} |

Memory of `pvhost run` with {m["vms"]} simulated VMs (one QMP + one channel session each, every
session greeted, program injected, 3 AffinityUpdates answered after {m["all_answered_after_s"]} s):
RSS {m["rss_kib"]} KiB (peak {m["peak_rss_kib"]} KiB); the interpreter with pvhost imported and
no VM: {m["interpreter_with_imports_rss_kib"]} KiB → ≈ {m["per_vm_kib"]} KiB per VM.

The cgroup v2 backend is measured inside the VM harness (this host has no v2 cpuset).
"""  # noqa: E501
    (args.out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
