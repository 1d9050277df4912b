#!/usr/bin/env python3
"""The agent on a real virtio-serial port in a real guest (QEMU/TCG, Debian trixie).

What the unit and integration tests cannot reach on a host without virtio ports:
udev discovery of the port by name, host disconnect/reconnect (SIGIO), unplug/replug
(QMP device_del/device_add), the guest's state read back each time, and a guest thread's
pin and exit reaching the host. Records how long each step took (under TCG: slow, compare
ratios) in bench/results/agent-vm.md and .json.

The agent is the generic one (protocol 4): it forwards the affinity program's records and
answers map reads; this script plays pvhost's affinity service with pvhost's own decoder and
tracker (the records → the guest's wish), and reads the program's ``pv_tracked`` map after
each (re)connection, as the service resynchronises.

The guest is a minimal trixie rootfs built once with mmdebstrap into --cache (about
1.5 minutes; later runs boot it again, about 40 s). The worktree is shared read-only
over 9p and the agent runs from it: ``python3 -m pvagent run`` (trust = any).

    sudo .venv/bin/python bench/agent_vm_port.py [--cache /var/tmp/extpv-agent-vm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pvagent import bpfobj
from pvhost.services.affinity_event import decode, decode_tracked
from pvhost.services.affinity_tracker import AffinityTracker
from pvproto import (
    AffinityUpdate,
    Hello,
    LoadProgram,
    MapContents,
    ProgramLoaded,
    ProgramRecords,
    ReadMap,
)
from vmlab.errors import MonitorError
from vmlab.hostpeer import HostEnd
from vmlab.monitor import qmp_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ",".join(
    (
        "linux-image-amd64", "udev", "kmod", "libbpf1",
        "python3", "python3-pydantic", "python3-pyudev", "python3-cryptography",
    )
)  # fmt: skip
MIRROR = "http://deb.debian.org/debian"

# PID 1 of the guest: udev, the shares, a guest application, and the agent.
INIT = r"""#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /run; mount -t tracefs nodev /sys/kernel/tracing
/usr/lib/systemd/systemd-udevd --daemon; udevadm trigger --action=add; udevadm settle
modprobe 9pnet_virtio; modprobe 9p; mkdir -p /mnt/src /mnt/ctl
mount -t 9p -o trans=virtio,version=9p2000.L src /mnt/src
mount -t 9p -o trans=virtio,version=9p2000.L ctl /mnt/ctl
printf 'trust = "any"\n' > /run/pvagent.toml
python3 -c '
import os, time
while not os.path.exists("/mnt/ctl/pin"): time.sleep(0.05)
os.sched_setaffinity(0, {1})
while not os.path.exists("/mnt/ctl/exit"): time.sleep(0.05)
' &
cd /mnt/src && PYTHONPATH=/mnt/src exec python3 -m pvagent -v run --config /run/pvagent.toml
"""


def build_image(cache: Path) -> None:
    if (cache / "root.img").exists():
        return
    rootfs = cache / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    print("building the guest rootfs (mmdebstrap, ~1.5 min)", file=sys.stderr)
    subprocess.run(
        ["mmdebstrap", "--variant=apt", "--mode=root", f"--include={PACKAGES}", "trixie",
         str(rootfs), f"deb {MIRROR} trixie main"],
        check=True, capture_output=True,
    )  # fmt: skip
    (rootfs / "init-agent.sh").write_text(INIT)
    (rootfs / "init-agent.sh").chmod(0o755)
    for kind in ("vmlinuz", "initrd.img"):
        shutil.copy(next((rootfs / "boot").glob(f"{kind}-*")), cache / kind)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(cache / "root.img.tmp"), "3G"], check=True
    )
    (cache / "root.img.tmp").rename(cache / "root.img")
    shutil.rmtree(rootfs)


async def qmp(sock: Path, command: str, **arguments: object) -> object:
    """One QMP command through the lab's qemu.qmp client; MonitorError if QEMU refuses."""
    return await asyncio.to_thread(qmp_command, sock, command, arguments or None)


class Affinity:
    """What pvhost's affinity service does with a generic agent: records → tracker → wish."""

    def __init__(self) -> None:
        self.updates: asyncio.Queue[AffinityUpdate] = asyncio.Queue()
        self.tracker = AffinityTracker([0, 1], self.updates.put_nowait, window=0.020)
        self.host: HostEnd | None = None

    async def load(self, host: HostEnd, obj: bytes) -> None:
        """Load (or find loaded) the program and read its table back (a resync)."""
        self.host = host
        host.send(LoadProgram.for_payload("affinity", "bpf-object", obj, request_id=1))
        assert (await host.expect(ProgramLoaded, 60)).ok
        host.send(ReadMap(program_id="affinity", map="pv_tracked", request_id=2))
        contents = await host.expect(MapContents, 30)
        self.tracker.replace_all(dict(decode_tracked(e.key, e.value) for e in contents.entries))

    async def until(self, wanted: list[int], timeout: float) -> AffinityUpdate:
        """The next published wish equal to ``wanted`` (records decoded as they come)."""
        assert self.host is not None
        async with asyncio.timeout(timeout):
            while True:
                await asyncio.sleep(0.05)  # past the tracker's coalescing window
                while not self.updates.empty():
                    update = self.updates.get_nowait()
                    if update.wanted == wanted:
                        return update
                try:
                    batch = await self.host.expect(ProgramRecords, 0.2)
                except AssertionError:  # none yet (HostEnd's "no ... within")
                    continue
                for record in batch.records:
                    self.tracker.handle(decode(record))


async def scenario(cache: Path, run: Path) -> dict[str, float]:
    agent_sock, qmp_sock, ctl = run / "agent.sock", run / "qmp.sock", run / "ctl"
    ctl.mkdir()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
         "-m", "1G", "-nographic", "-monitor", "none", "-serial", f"file:{run}/console.log",
         "-kernel", str(cache / "vmlinuz"), "-initrd", str(cache / "initrd.img"),
         "-append", "root=/dev/vda rw console=ttyS0 init=/init-agent.sh quiet",
         "-drive", f"file={cache}/root.img,format=raw,if=virtio,snapshot=on",
         "-virtfs", f"local,path={ROOT},mount_tag=src,security_model=none,readonly=on",
         "-virtfs", f"local,path={ctl},mount_tag=ctl,security_model=none",
         "-qmp", f"unix:{qmp_sock},server=on,wait=off",
         "-device", "virtio-serial-pci,id=vser0",
         "-chardev", f"socket,path={agent_sock},server=on,wait=off,id=pv0",
         "-device", "virtserialport,bus=vser0.0,chardev=pv0,name=org.extpv.agent.0,id=pvport"],
    )  # fmt: skip
    times: dict[str, float] = {}
    started = time.monotonic()

    def since(mark: float) -> float:
        return round(time.monotonic() - mark, 3)

    try:
        while not agent_sock.exists():
            await asyncio.sleep(0.05)
        host = HostEnd(*await asyncio.open_unix_connection(str(agent_sock)))
        await host.expect(Hello, 240)
        times["boot_to_agent_hello_s"] = since(started)
        host.hello()
        affinity = Affinity()
        obj = bpfobj.read("affinity.bpf.o")
        mark = time.monotonic()
        await affinity.load(host, obj)
        times["load_program_round_trip_s"] = since(mark)
        mark = time.monotonic()
        (ctl / "pin").touch()
        await affinity.until([1], 30)
        times["guest_pin_to_host_update_s"] = since(mark)
        host.close()
        await asyncio.sleep(1)
        mark = time.monotonic()
        host = HostEnd(*await asyncio.open_unix_connection(str(agent_sock)))
        await host.expect(Hello, 30)
        times["host_reconnect_to_hello_s"] = since(mark)
        host.hello()
        affinity = Affinity()  # a host that knows nothing: the state read back
        await affinity.load(host, obj)
        await affinity.until([1], 30)
        await qmp(qmp_sock, "device_del", id="pvport")
        await asyncio.sleep(3)
        mark = time.monotonic()
        await qmp(
            qmp_sock, "device_add", driver="virtserialport", bus="vser0.0", chardev="pv0",
            name="org.extpv.agent.0", id="pvport",
        )  # fmt: skip
        await host.expect(Hello, 60)
        times["replug_to_hello_s"] = since(mark)
        host.hello()
        affinity = Affinity()
        await affinity.load(host, obj)
        await affinity.until([1], 30)
        mark = time.monotonic()
        (ctl / "exit").touch()
        await affinity.until([], 30)
        times["guest_exit_to_host_update_s"] = since(mark)
        host.close()
    finally:
        try:
            await asyncio.wait_for(qmp(qmp_sock, "quit"), 10)
        except (MonitorError, TimeoutError):
            qemu.kill()
        qemu.wait(30)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/extpv-agent-vm"))
    args = parser.parse_args()
    build_image(args.cache)
    run = Path(
        subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip()
    )
    try:
        times = asyncio.run(asyncio.wait_for(scenario(args.cache, run), 400))
    except BaseException:
        print((run / "console.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        shutil.rmtree(run, ignore_errors=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "accel": "tcg", **times}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent-vm.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in times.items())
    (RESULTS / "agent-vm.md").write_text(
        "# Guest agent on a real virtio-serial port\n\n"
        f"Recorded {results['date']}: Debian trixie guest (kernel 6.12) under QEMU TCG, "
        "`-smp 2`, by `sudo .venv/bin/python bench/agent_vm_port.py`. Every step passed; "
        "times are host wall-clock seconds (TCG: slow, compare ratios).\n\n"
        "| step | seconds |\n|---|---|\n" + rows + "\n\n"
        "Steps: boot → agent Hello (udev found the port by name); unsigned LoadProgram "
        "round trip (trust = any) and the program's pv_tracked map read; a guest thread "
        "pins itself to vCPU 1 → its record, decoded and tracked on the host → wish [1]; "
        "the host disconnects and reconnects → Hello (SIGIO), and a host that knew nothing "
        "reads the state back (pv_tracked); QMP device_del + device_add of the port → Hello "
        "and the state read back again; the thread exits → wish [].\n"
    )
    print((RESULTS / "agent-vm.md").read_text())
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
