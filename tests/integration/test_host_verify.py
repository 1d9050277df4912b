"""`pvctl verify` against a running `pvhost run`: real QEMU, real cgroup v1 cpusets. A placement
changed behind pvhost's back must be reported, with the vCPU it concerns, and exit status 1."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from pvhost.placement import thread_allowed_cpus
from tests.integration.hostrun import daemon_and_guest, free_port, write_config
from vmlab import VirtualMachine

pytestmark = [pytest.mark.root, pytest.mark.vm]

CPUSET = Path("/sys/fs/cgroup/cpuset")


def test_verify_passes_then_reports_a_vcpu_moved_behind_pvhosts_back(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    tid = qemu.vcpu_threads()[1].tid
    config = write_config(tmp_path, qemu, cpuset_group, free_port())

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):
            rc, out = await daemon.pvctl("verify")
            assert (rc, out.strip()) == (0, "0 placement(s) verified"), out
            result = await guest.update(1, [1])
            assert [(p.vcpu, p.pcpu) for p in result.placements] == [(1, 1)]
            rc, out = await daemon.pvctl("verify")
            assert (rc, out.strip()) == (0, "1 placement(s) verified"), out

            # Someone else moves the vCPU thread out of its cpuset (back to the root).
            (CPUSET / "tasks").write_text(str(tid))
            assert thread_allowed_cpus(tid) != {1}
            rc, out = await daemon.pvctl("verify")
            assert rc == 1, out
            moved = (
                f"VM t vCPU 1 (thread {tid}, pCPU 1): "
                f"cgroup should be /{cpuset_group}/vm-t/vcpu1, the kernel says /\n"
            )
            assert moved in out, out
            assert "affinity should be 1" in out, out
            assert "1 of 1 placement(s) drifted" in out, out
            rc, out = await daemon.pvctl("verify", "--json")
            assert rc == 1, out
            report = json.loads(out)
            assert report["placements"] == 1
            assert {(f["vm"], f["vcpu"], f["check"]) for f in report["findings"]} == {
                ("t", 1, "cgroup"),
                ("t", 1, "affinity"),
            }

            await daemon.stop(signal.SIGTERM)
            assert not (CPUSET / cpuset_group).exists()

    asyncio.run(scenario())
