"""Guest pin → host placement, a libvirt domain vs a plain QEMU VM, in the same run.

The cycle of ``bench/vm_latency.py`` (a guest thread pins itself to vCPU 1 and back, host
CLOCK_REALTIME mapped from the guest's through the test hook, the vCPU thread's allowed CPUs
watched on the host) run twice: once against the test image as a libvirt domain (private
libvirtd, pvhost with ``[libvirt]``, placement through ``virDomainPinVcpuFlags``), once against
the lab's plain QEMU (pvhost's cgroup v1 backend). Also records domain start → the affinity
program loaded. Writes ``bench/results/libvirt-vm.json``; ``bench/results/libvirt.md`` quotes it.

Run as root, holding the tests' lock:
``flock /tmp/extpv-tests.lock .venv/bin/python bench/libvirt_vm_latency.py [--cycles N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from exp_stats import percentile  # noqa: E402
from vm_latency import CYCLER, match_events, run_cycler  # noqa: E402

from pvhost.libvirt import qemu_pid_of_domain, safe_name, vcpu_threads  # noqa: E402
from vmlab import VMSpec, start  # noqa: E402
from vmlab.daemon import PvhostDaemon  # noqa: E402
from vmlab.images import ensure_test_image  # noqa: E402
from vmlab.libvirtd import Libvirtd, domain_xml  # noqa: E402
from vmlab.testhook import TestHook  # noqa: E402

DOMAIN = "extpv-bench-latency"


def cycle(hook: TestHook, tid: int, cycles: int, hold: float) -> dict[str, Any]:
    off0, err0 = hook.clock_offset(30)
    stdout, changes = run_cycler(
        lambda argv, timeout_s: hook.run(argv, timeout_s, ""), tid, CYCLER, cycles, hold
    )
    off1, err1 = hook.clock_offset(30)
    offset = (off0 + off1) / 2
    error = max(err0, err1) + abs(off1 - off0) / 2
    lat, missed = match_events(json.loads(stdout), changes, offset, error)
    out: dict[str, Any] = {"unmatched": missed, "clock_error_ms": round(error * 1000, 2)}
    for kind, values in lat.items():
        out[kind] = {
            "n": len(values),
            "p50_ms": round(percentile(values, 50), 1),
            "p99_ms": round(percentile(values, 99), 1),
        }
    return out


def loaded(name: str) -> Any:
    return lambda s: s["vms"].get(name, {}).get("programs") == {"affinity": "loaded"}


def run_libvirt(work: Path, cycles: int, hold: float) -> dict[str, Any]:
    image = ensure_test_image(REPO)
    lv = Libvirtd(work / "libvirtd")
    (work / "libvirtd").mkdir()
    vm_dir = work / "domain"
    vm_dir.mkdir()
    (vm_dir / "domain.xml").write_text(domain_xml(DOMAIN, image.path, vm_dir, test_hook=True))
    hook = TestHook(vm_dir / "test.sock", DOMAIN)
    (work / "pvhost-lv").mkdir()
    (work / "empty-vms").mkdir()
    daemon = PvhostDaemon(
        work / "pvhost-lv",
        work / "empty-vms",
        image.signing_key,
        extra_config=f'\n[libvirt]\nenabled = true\nuri = "{lv.uri}"\n',
    )
    try:
        lv.start()
        daemon.start()
        lv.virsh("define", str(vm_dir / "domain.xml"))
        t0 = time.monotonic()
        lv.virsh("start", DOMAIN)
        uuid = lv.virsh("domuuid", DOMAIN).stdout.strip()
        name = safe_name(DOMAIN, uuid)
        daemon.wait_status("the affinity program loaded", loaded(name), 300)
        start_to_loaded = time.monotonic() - t0
        hook.ping(120)
        pid = qemu_pid_of_domain(uuid)
        assert pid is not None
        tid = vcpu_threads(pid, (1, 1, 1, 1))[1].tid
        result = cycle(hook, tid, cycles, hold)
        result["domain_start_to_program_loaded_s"] = round(start_to_loaded, 1)
        return result
    finally:
        hook.close()
        daemon.close()
        lv.virsh("destroy", DOMAIN, check=False)
        lv.virsh("undefine", DOMAIN, check=False)
        lv.stop()


def run_plain(work: Path, cycles: int, hold: float) -> dict[str, Any]:
    image = ensure_test_image(REPO)
    runtime = Path("/run/extpv-bench") / f"lv-{os.getpid()}" / "vms"
    runtime.mkdir(parents=True, exist_ok=True)
    (work / "pvhost-plain").mkdir()
    vm = start(VMSpec(name="bench", image=image.path, smp=2, runtime_dir=runtime, test_hook=True))
    daemon = PvhostDaemon(work / "pvhost-plain", runtime, image.signing_key)
    try:
        daemon.start()
        daemon.wait_status("the affinity program loaded", loaded("bench"), 180)
        tid = vm.vcpu_threads()[1].tid
        return cycle(vm._test_hook(), tid, cycles, hold)
    finally:
        vm.stop()
        daemon.close()
        shutil.rmtree(runtime.parent, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--hold", type=float, default=0.4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        result = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cycles": args.cycles,
            "libvirt": run_libvirt(work, args.cycles, args.hold),
            "plain": run_plain(work, args.cycles, args.hold),
        }
    out = REPO / "bench" / "results" / "libvirt-vm.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
