"""Pin/unpin latency of a vCPU thread: through libvirt vs extpv's own cgroup v1 backend.

Same run, same host: a libvirt domain (private libvirtd, TCG, started paused: real vCPU
threads in libvirt's vcpuN cgroups, nothing booted) pinned with
:class:`pvhost.placement.libvirt.LibvirtPlacement` (``virDomainPinVcpuFlags`` + verify), and a
plain QEMU (``-S``) whose vCPU thread the cgroup v1 backend pins (cpuset + affinity + verify).
Writes ``bench/results/libvirt.json`` and prints the Markdown table.

Run as root, holding the tests' lock:
``flock /tmp/extpv-tests.lock .venv/bin/python bench/libvirt_pin.py [--iterations N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exp_stats import latency_summary  # noqa: E402

from pvhost.libvirt import LibvirtLink, qemu_pid_of_domain  # noqa: E402
from pvhost.libvirt import vcpu_threads as libvirt_vcpus  # noqa: E402
from pvhost.placement import detect_backend  # noqa: E402
from pvhost.placement.libvirt import LibvirtPlacement  # noqa: E402
from vmlab import VMSpec, start  # noqa: E402
from vmlab.libvirtd import Libvirtd  # noqa: E402

PAUSED_DOMAIN = """<domain type='qemu'>
  <name>extpv-bench</name><uuid>00000000-0000-4000-8000-00000000be4c</uuid>
  <memory unit='MiB'>64</memory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><memballoon model='none'/></devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


def cycles(backend: Any, vm: str, tid: int, n: int) -> dict[str, Any]:
    pins, unpins = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        backend.pin(vm, 1, tid, 1)
        t1 = time.perf_counter()
        backend.unpin(vm, 1)
        pins.append(t1 - t0)
        unpins.append(time.perf_counter() - t1)
    return {"pin": latency_summary(pins), "unpin": latency_summary(unpins)}


async def bench_libvirt(lv: Libvirtd, tmp: Path, n: int) -> dict[str, Any]:
    xml = tmp / "bench.xml"
    xml.write_text(PAUSED_DOMAIN)
    lv.virsh("create", str(xml), "--paused")
    try:
        link = LibvirtLink(lv.uri, 1.0, lambda: None)
        await link.start()
        while not link.connected:
            await asyncio.sleep(0.05)
        uuid = "00000000-0000-4000-8000-00000000be4c"
        pid = qemu_pid_of_domain(uuid)
        assert pid is not None
        tid = libvirt_vcpus(pid, (1, 1, 1, 1))[1].tid
        placement = LibvirtPlacement(link, tmp / "libvirt.json")
        placement.known("bench", uuid, "extpv-bench")
        result = await asyncio.to_thread(cycles, placement, "bench", tid, n)
        await link.stop()
        return result
    finally:
        lv.virsh("destroy", "extpv-bench", check=False)


def bench_plain(tmp: Path, n: int) -> dict[str, Any]:
    qemu = start(VMSpec.empty("lvbench", tmp / "vms", smp=2))
    # cgroup v1: move mode, as bench/results/libvirt.md was recorded (a thread move per pin).
    backend = detect_backend(
        Path("/sys/fs/cgroup"), tmp / "state", group="extpv-lvbench", cgroup1_mode="move"
    )
    try:
        tids = {i: v.tid for i, v in qemu.vcpu_threads().items()}
        backend.setup(frozenset({0, 1}))
        backend.attach("plain", qemu.pid, tids)
        return cycles(backend, "plain", tids[1], n)
    finally:
        backend.detach("plain")
        backend.teardown()
        qemu.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lv = Libvirtd(tmp / "libvirtd")
        (tmp / "libvirtd").mkdir()
        lv.start()
        try:
            via_libvirt = asyncio.run(bench_libvirt(lv, tmp, args.iterations))
        finally:
            lv.stop()
        plain = bench_plain(tmp, args.iterations)
    result = {
        "machine": f"{platform.node()} {platform.release()}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "libvirt": via_libvirt,
        "cgroup1": plain,
    }
    out = ROOT / "bench" / "results" / "libvirt.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| path | step | n | p50 ms | p99 ms | mean ms |\n|---|---|---|---|---|---|")
    for path, label in (("libvirt", "libvirt domain, virDomainPinVcpuFlags"),
                        ("cgroup1", "plain QEMU, extpv cgroup v1 backend")):  # fmt: skip
        for step in ("pin", "unpin"):
            s = result[path][step]  # type: ignore[index]
            print(
                f"| {label} | {step} | {s['n']} | {s['p50_ms']} | {s['p99_ms']} | {s['mean_ms']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
