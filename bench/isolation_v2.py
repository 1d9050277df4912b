"""cgroup v2 isolation: pin/unpin latency and CPU share per partition mode → bench/results/.

Modes: ``remote`` (trixie's 6.12 kernel, ``cpuset.cpus.exclusive``) and ``local`` (Debian 12's
6.1 kernel, the chain of local partitions). This machine's cpuset is cgroup v1, so each kernel
runs in a TCG guest (-smp 4) acting as a host: the test image, and its 6.1 variant
(vmlab.images.ensure_test_image_kernel61). In the guest this script (``--in-guest``) drives
this checkout's cgroup v2 backend as the daemon drives it: a spinning thread stands in for a
vCPU thread (pinned to pCPU 1; CPU 0 is housekeeping), p50/p99 of ``pin`` and ``unpin`` over
``--cycles`` cycles, idle and under 4 x CPUs ``yes`` processes, and the thread's CPU share
under that load with and without the pin.

Run as root on the host: ``.venv/bin/python bench/isolation_v2.py [--cycles N]``
(``EXTPV_TEST_IMAGE`` as for the tests). Writes ``isolation-v2.md`` and ``isolation-v2.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("EXTPV_SRC", str(ROOT)))

CGROUP = Path("/sys/fs/cgroup")
PCPU = 1
SPIN = "import os, threading\nprint(threading.get_native_id(), flush=True)\nwhile True: pass"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms_summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 0.5), 3),
        "p99_ms": round(pct(ms, 0.99), 3),
        "max_ms": round(max(ms), 3),
    }


def share(tid: int, seconds: float) -> float:
    def run_ns() -> int:
        return int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])

    t0, r0 = time.monotonic_ns(), run_ns()
    time.sleep(seconds)
    return (run_ns() - r0) / (time.monotonic_ns() - t0)


def in_guest(cycles: int, loaded_cycles: int) -> dict[str, Any]:
    """The measurement, inside the guest: JSON on stdout."""
    from pvhost.placement.cgroup2 import Cgroup2Backend

    spin = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    assert spin.stdout is not None
    tid = int(spin.stdout.readline())
    yes: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        backend = Cgroup2Backend(CGROUP, Path(tmp) / "state.json")
        backend.setup(frozenset({1, 2, 3}))
        out["mode"] = backend.mode
        try:
            backend.attach("bench", spin.pid, {0: tid})

            def cycle(n: int) -> dict[str, Any]:
                pins: list[float] = []
                unpins: list[float] = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    backend.pin("bench", 0, tid, PCPU)
                    t1 = time.perf_counter()
                    backend.unpin("bench", 0)
                    pins.append(t1 - t0)
                    unpins.append(time.perf_counter() - t1)
                return {"pin": ms_summary(pins), "unpin": ms_summary(unpins)}

            out["idle"] = cycle(cycles)
            for _ in range(4 * (os.cpu_count() or 1)):
                yes.append(
                    subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True)
                )
            out["load_processes"] = len(yes)
            out["loaded"] = cycle(loaded_cycles)
            out["share_unpinned"] = round(share(tid, 3.0), 3)
            backend.pin("bench", 0, tid, PCPU)
            time.sleep(0.2)
            out["share_pinned"] = round(share(tid, 3.0), 3)
            backend.unpin("bench", 0)
        finally:
            for p in yes:
                p.kill()
                p.wait()
            spin.kill()
            spin.wait()
            backend.teardown()
    return out


def on_host(cycles: int, loaded_cycles: int) -> list[dict[str, Any]]:
    """Boot each kernel's guest in turn and run this script inside it."""
    from vmlab import VMSpec, start
    from vmlab.images import ensure_test_image, ensure_test_image_kernel61

    runs = []
    runtime = Path(tempfile.mkdtemp(prefix="extpv-bench-v2-"))
    for name, image in (
        ("k612", ensure_test_image(ROOT)),
        ("k61", ensure_test_image_kernel61(ROOT)),
    ):
        spec = VMSpec(name=name, image=image.path, smp=4, memory_mib=1536, runtime_dir=runtime,
                      virtfs=((ROOT, "extpv"),), test_hook=True)  # fmt: skip
        vm = start(spec, deadline_s=300, retries=2)
        try:
            vm.mount_virtfs("extpv", "/mnt/extpv")
            r = vm.guest(
                ["env", "PYTHONDONTWRITEBYTECODE=1", "python3",
                 "/mnt/extpv/bench/isolation_v2.py", "--in-guest", "--cycles", str(cycles),
                 "--loaded-cycles", str(loaded_cycles)],
                timeout_s=900,
            )  # fmt: skip
            if r.returncode != 0:
                sys.exit(f"isolation_v2 in the {name} guest failed:\n{r.stderr[-3000:]}")
            runs.append(json.loads(r.stdout))
        finally:
            vm.stop()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="pin+unpin cycles per case")
    parser.add_argument(
        "--loaded-cycles", type=int, default=20,
        help="cycles under the yes load (each takes seconds under TCG: the load starves pvhost)",
    )  # fmt: skip
    parser.add_argument("--in-guest", action="store_true", help="measure here (in the guest)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()
    if args.in_guest:
        print(json.dumps(in_guest(args.cycles, args.loaded_cycles)))
        return 0
    runs = on_host(args.cycles, args.loaded_cycles)
    result = {
        "host": f"{platform.node()} {platform.release()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cycles": args.cycles,
        "loaded_cycles": args.loaded_cycles,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "isolation-v2.json").write_text(json.dumps(result, indent=2) + "\n")

    def lat(r: dict[str, Any], case: str, what: str) -> str:
        return f"{r[case][what]['p50_ms']} / {r[case][what]['p99_ms']}"

    rows = "\n".join(
        f"| {r['mode']} | {r['kernel']} | {lat(r, 'idle', 'pin')} | {lat(r, 'idle', 'unpin')} | "
        f"{lat(r, 'loaded', 'pin')} | {lat(r, 'loaded', 'unpin')} | {r['share_unpinned']:.0%} | "
        f"{r['share_pinned']:.0%} |"
        for r in runs
    )
    load = runs[0]["load_processes"] if runs else 0
    md = f"""# cgroup v2 isolation: pin/unpin latency and CPU share per partition mode

Host: {result["host"]}; {result["date"]}. Each kernel runs in a QEMU TCG guest (-smp 4) acting
as a host (this host's cpuset is cgroup v1): absolute times are inflated by emulation, compare
the modes. Command: `bench/isolation_v2.py --cycles {args.cycles} --loaded-cycles
{args.loaded_cycles}` (raw: `isolation-v2.json`). Latency is the backend's own (cgroupfs writes +
read-back + verify) for a spinning thread standing in for a vCPU thread, pinned to pCPU 1,
p50 / p99 over {args.cycles} cycles idle and {args.loaded_cycles} under the load ({load} `yes`
processes, own sessions, on every CPU of the guest: the pinning process itself gets a small
share of a CPU then, so those figures measure the starvation more than the kernel).

| mode | guest kernel | idle pin ms | idle unpin ms | loaded pin ms | loaded unpin ms | share unpinned | share pinned |
|---|---|---|---|---|---|---|---|
{rows}

*share*: the thread's fraction of one CPU over 3 s under the load. `remote` writes the vCPU's
and the VM's `cpuset.cpus.exclusive` and one partition; the `local` chain also grows and
shrinks extpv.slice and the VM's partition (with the spare-CPU step the 6.1 kernel needs), so
each pin and unpin makes about three times as many cgroupfs writes, each read back.
"""  # noqa: E501
    (args.out / "isolation-v2.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
