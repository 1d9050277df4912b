"""Runs INSIDE the test guest (cgroup v2 with cpuset) acting as a host: isolation through the
real pvhost daemon, as issue 9 item 4 asks.

``pvhost run`` of this checkout (cgroup v2 backend, pool policy, CPU 0 housekeeping) serves a
real nested QEMU (TCG, no OS: its vCPU 0 runs a boot sector that spins, vmlab.bootsector.SPIN);
the guest agent's side is played on the VM's channel socket (vmlab.guestpeer.FakeGuestChannel,
the lab's named fake peer). 4 x CPUs ``yes`` processes load the guest-host. The kernel's own
accounting decides (``/proc/<pid>/stat`` last CPU, ``/proc/<tid>/schedstat``). The daemon's
host-only dependencies that the image lacks (qemu.qmp, prometheus_client: pure Python) come
over 9p from ``EXTPV_GUEST_PYLIB``. Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_T0 = time.monotonic()

SRC = os.environ.get("EXTPV_SRC", "/mnt/extpv")
PYLIB = os.environ.get("EXTPV_GUEST_PYLIB", f"{SRC}/images/out/guest-pylib")
sys.path.insert(0, SRC)
sys.path.append(PYLIB)  # after the image's own packages (pydantic comes from the image)
os.environ["PYTHONPATH"] = f"{SRC}:{PYLIB}"  # for the daemon and pvctl subprocesses
# Bytecode cached in the guest, not in the checkout: the daemon and each pvctl compile nothing
# again after the warm-up below (a cold start under TCG exceeds the harness's 15 s).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ["PYTHONPYCACHEPREFIX"] = "/tmp/extpv-pycache"

from tests.cpuacct import load_on, share, share_and_idle  # noqa: E402
from tests.integration.hostrun import Daemon, daemon_and_guest, free_port  # noqa: E402
from vmlab import VMSpec, start  # noqa: E402
from vmlab.bootsector import SPIN  # noqa: E402


class GuestHostDaemon(Daemon):
    """``pvhost run`` as the harness starts it, with the start-up time a TCG guest needs
    (Python start-up over 9p: measured 15-40 s on a fresh guest)."""

    start_timeout_s = 120
    pvctl_timeout_s = 120
    stop_grace_s = 120


def config(tmp: Path, qmp: Path, agent: Path) -> Path:
    program = tmp / "affinity.bpf.o"
    program.write_bytes(b"\x7fELF test payload: the guest is played by the test")
    path = tmp / "pvhost.toml"
    path.write_text(f"""
[service]
runtime_dir = "{tmp / "runtime"}"
state_dir = "{tmp / "state"}"
control_socket = "{tmp / "pvhost.sock"}"
metrics = "127.0.0.1:{free_port()}"
signing_key = "{tmp / "no-key"}"
affinity_program = "{program}"
max_backoff = 0.5

[placement]
backend = "cgroup2"
housekeeping = "0"
policy = "pool"
quota = 1

[vms.t]
qmp = "{qmp}"
agent = "{agent}"
""")
    return path


async def scenario(
    tmp: Path,
    qemu: Any,
    tid: int,
    procs: list[subprocess.Popen[bytes]],
    mark: Callable[[str], None],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    agent = qemu.dir / "agent.sock"
    setup = config(tmp, qemu.qmp_socket, agent)
    async with daemon_and_guest(
        tmp, setup, agent, daemon_class=GuestHostDaemon, connect_timeout=60
    ) as (daemon, guest):
        mark("daemon up, guest connected")
        # The load starts once the daemon is up (its start-up under TCG with the load running
        # exceeds the harness's 15 s), before the guest's pin.
        for _ in range(4 * (os.cpu_count() or 1)):
            procs.append(
                subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True)
            )
        out["load"] = len(procs)
        yes = [p.pid for p in procs]
        await asyncio.sleep(0.5)
        out["contended"] = await asyncio.to_thread(share, tid)
        mark("contended share")
        t0 = time.monotonic()
        result = await guest.update(1, [0], timeout=60)
        out["pin_ms"] = (time.monotonic() - t0) * 1000
        out["placements"] = [p.model_dump(mode="json") for p in result.placements]
        pcpu = result.placements[0].pcpu if result.placements else -1
        out["pcpu"] = pcpu
        await asyncio.sleep(0.3)
        out["load_on_pcpu"] = await asyncio.to_thread(load_on, yes, pcpu)
        window = await asyncio.to_thread(share_and_idle, tid, pcpu)
        out["pinned"] = window["got"]
        out.update({f"pcpu_{part}": window[part] for part in window if part != "got"})
        mark("pinned, shares")
        # pvctl is a fresh Python process: under TCG with the load running its start-up takes
        # longer than the harness's 30 s, so the load pauses while the status is read.
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        rc, text = await daemon.pvctl("status", "--json")
        status = json.loads(text) if rc == 0 else {"rc": rc, "out": text}
        out["status_placements"] = status.get("vms", {}).get("t", {}).get("placements")
        out["status_isolation"] = status.get("isolation")
        out["local_chain"] = status.get("backend_detail", {}).get("local_chain")
        mark("pvctl status --json")
        rc, text = await daemon.pvctl("status")
        out["status_text"] = text
        mark("pvctl status")
        for p in procs:
            p.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await guest.update(2, [], timeout=60)
        out["unpin_ms"] = (time.monotonic() - t0) * 1000
        await asyncio.sleep(0.3)
        out["load_after"] = await asyncio.to_thread(load_on, yes, pcpu)
        out["released"] = await asyncio.to_thread(share, tid)
        mark("released, shares")
        await daemon.stop()
        mark("daemon stopped")
        out["daemon_rc"] = daemon.returncode
        out["daemon_log"] = daemon.log()[-3000:]
    return out


def _stages(out: dict[str, Any]) -> Callable[[str], None]:
    """``mark(stage)``: seconds since the script started, kept in ``out["stages"]`` (where a
    run under TCG spends its minutes)."""
    stages: dict[str, float] = out.setdefault("stages", {})

    def mark(stage: str) -> None:
        stages[stage] = round(time.monotonic() - _T0, 1)

    return mark


def main() -> None:
    obs: dict[str, Any] = {}
    mark = _stages(obs)
    mark("the script's imports")
    subprocess.run(
        [sys.executable, "-c", "import pvhost.cli, pvhost.ctl, pvhost.service"], check=True
    )
    mark("host code compiled")
    tmp = Path(tempfile.mkdtemp(prefix="extpv-daemon-iso-"))
    qemu = start(VMSpec.empty("iso", tmp / "vm", smp=2, boot_code=SPIN))
    mark("nested QEMU up")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tid = qemu.vcpu_threads()[0].tid
        run = scenario(tmp, qemu, tid, procs, mark)
        obs.update(asyncio.run(asyncio.wait_for(run, 400)))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        qemu.kill()
        qemu.stop()
    obs["slice_left"] = Path("/sys/fs/cgroup/extpv.slice").exists()
    obs["root_effective"] = Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text().strip()
    print(json.dumps(obs))


if __name__ == "__main__":
    main()
