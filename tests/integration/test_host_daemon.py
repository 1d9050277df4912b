"""The daemon as operators run it: `pvhost run` + `pvctl`, /metrics, and crash safety
(kill -9 then restart adopts live pins; a VM that died meanwhile is undone; nothing leaks)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from pathlib import Path

import pytest

from pvhost.placement import thread_allowed_cpus
from tests.integration.hostrun import Daemon, daemon_and_guest, free_port, write_config
from vmlab import VirtualMachine

pytestmark = [pytest.mark.root, pytest.mark.vm]

CPUSET = Path("/sys/fs/cgroup/cpuset")


def test_kill9_restart_adopts_then_sigterm_restores(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    tid = qemu.vcpu_threads()[2].tid
    before = thread_allowed_cpus(tid)
    port = free_port()
    config = write_config(tmp_path, qemu, cpuset_group, port)

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):
            # Quota 1: the second vCPU is refused with a reason; pool skips housekeeping CPU 0.
            result = await guest.update(1, [1, 2])
            placed = {p.vcpu: (p.pcpu, p.refused) for p in result.placements}
            assert placed[1] == (1, None)
            assert placed[2][0] is None and "quota" in (placed[2][1] or "")
            result = await guest.update(2, [2])
            assert [(p.vcpu, p.pcpu) for p in result.placements] == [(2, 1)]
            assert thread_allowed_cpus(tid) == {1}

            rc, out = await daemon.pvctl("status", "--json")
            assert rc == 0, out
            status = json.loads(out)
            assert status["backend"] == "cgroup1"
            vm = status["vms"]["t"]
            assert vm["vcpus"]["2"]["tid"] == tid and vm["wanted"] == [2]
            assert vm["placements"]["2"]["pcpu"] == 1
            assert vm["programs"] == {"affinity": "loaded"}
            assert 0 <= vm["last_request_age_s"] < 30, vm
            rc, text = await daemon.pvctl("status")
            assert rc == 0, text
            # The compact table: vCPU 2's row reads tid, wanted, pCPU 1, restricted (cgroup v1
            # without isolate_from); vCPU 1 is no longer wanted; the request's age and seq.
            rows = {line.split()[0]: line.split() for line in text.splitlines()[4:]
                    if line.startswith("  ") and line.split()[0].isdigit()}  # fmt: skip
            assert rows["2"] == ["2", str(tid), "yes", "1", "restricted"], text
            assert rows["1"][2:] == ["no", "-", "-"], text
            assert re.search(r"last request \d+ s ago \(seq 2\)", text), text

            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read().decode()
            )  # fmt: skip
            assert 'extpv_refusals_total{code="quota"} 1.0' in metrics
            assert "extpv_pinned_vcpus 1.0" in metrics
            assert 'extpv_affinity_requests_total{vm="t"} 2.0' in metrics

            # kill -9: the pin survives the crash ...
            await daemon.stop(signal.SIGKILL)
            assert thread_allowed_cpus(tid) == {1}
            # ... and the restarted service adopts it (the VM is live, the thread unchanged).
            await daemon.start()
            async with asyncio.timeout(10):
                while guest.connections < 2:
                    await asyncio.sleep(0.05)
            result = await guest.update(3, [2])
            assert [(p.vcpu, p.pcpu) for p in result.placements] == [(2, 1)]
            assert thread_allowed_cpus(tid) == {1}

            rc, out = await daemon.pvctl("remap", "on", "t")
            assert rc == 0 and "policy ht-aware" in out, out
            rc, out = await daemon.pvctl("remap", "off", "t")
            assert rc == 0 and "policy pool" in out, out
            program = tmp_path / "extra.bpf.o"
            program.write_bytes(b"\x7fELF another program")
            rc, out = await daemon.pvctl("program", "load", "t", str(program))
            assert rc == 0 and "program extra loaded" in out, out
            assert guest.programs[-1].program_id == "extra"
            assert guest.programs[-1].payload == program.read_bytes()
            rc, out = await daemon.pvctl("release", "nosuchvm")
            assert rc == 1 and "no VM named 'nosuchvm'" in out, out

            rc, out = await daemon.pvctl("release", "t")
            assert rc == 0 and "released" in out, out
            assert thread_allowed_cpus(tid) == before
            result = await guest.update(4, [2])
            assert thread_allowed_cpus(tid) == {1}

            # A graceful stop undoes everything and removes extpv's cgroups.
            await daemon.stop(signal.SIGTERM)
            assert thread_allowed_cpus(tid) == before
            assert not (CPUSET / cpuset_group).exists()

    asyncio.run(scenario())


def test_kill9_then_vm_dies_restart_undoes_everything(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    config = write_config(tmp_path, qemu, cpuset_group, free_port())

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):
            result = await guest.update(1, [1])
            assert result.placements[0].pcpu == 1
            await daemon.stop(signal.SIGKILL)
            assert (CPUSET / cpuset_group / "vm-t" / "vcpu1").is_dir()
            qemu.kill()  # the VM goes away while no pvhost is watching
            await daemon.start()
            assert not (CPUSET / cpuset_group / "vm-t").exists()
            state = json.loads((tmp_path / "state" / "cgroup1.json").read_text())
            assert state["vms"] == {}
            await daemon.stop(signal.SIGTERM)
            assert not (CPUSET / cpuset_group).exists()

    asyncio.run(scenario())


def test_vm_exit_while_watched_is_undone_and_sigterm_removes_everything(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """QEMU exits while pvhost watches it (QMP hangs up): its pins are undone at once, the
    session waits for the VM to come back, and SIGTERM still removes extpv's own cgroup.

    Regression: qemu.qmp reports the hang-up as EOFError from disconnect(); it escaped the
    monitor's close(), ended the VM's session without undoing it, and then aborted
    Service.stop() at SIGTERM before the backend's teardown.
    """
    config = write_config(tmp_path, qemu, cpuset_group, free_port())

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):
            result = await guest.update(1, [1])
            assert result.placements[0].pcpu == 1
            vm_cgroup = CPUSET / cpuset_group / "vm-t"
            assert vm_cgroup.is_dir()
            qemu.kill()
            async with asyncio.timeout(10):
                while vm_cgroup.exists():
                    await asyncio.sleep(0.05)
            rc, out = await daemon.pvctl("status", "--json")
            assert rc == 0, out
            vm = json.loads(out)["vms"]["t"]
            assert vm["placements"] == {} and vm["qmp"] != "connected", vm
            await daemon.stop(signal.SIGTERM)
            log = daemon.log()
            assert daemon.returncode == 0, log
            assert "session had ended with an error" not in log, log
            assert not (CPUSET / cpuset_group).exists(), log

    asyncio.run(scenario())


class _Failed(Exception):
    """A test's assertion failing inside the daemon's context (raised on purpose)."""


def test_a_failure_inside_daemon_and_guest_leaves_no_cgroup_behind(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """The harness's cleanup after a test fails while the guest's pin holds: the daemon is
    stopped as operators stop it, so it undoes the pin and removes its cgroups (a kill -9
    there left pvhost's base cgroup behind)."""
    tid = qemu.vcpu_threads()[1].tid
    before = thread_allowed_cpus(tid)
    config = write_config(tmp_path, qemu, cpuset_group, free_port())
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):
            result = await guest.update(1, [1])
            assert [(p.vcpu, p.pcpu) for p in result.placements] == [(1, 1)], result
            seen["base"] = (CPUSET / cpuset_group).is_dir()
            seen["daemon"] = daemon
            raise _Failed

    with pytest.raises(_Failed):
        asyncio.run(asyncio.wait_for(scenario(), 60))
    assert seen["base"] is True, "the pin made pvhost's base cgroup"
    daemon = seen["daemon"]
    assert isinstance(daemon, Daemon)
    assert daemon.returncode == 0, f"stopped, not killed: rc {daemon.returncode}\n{daemon.log()}"
    assert not (CPUSET / cpuset_group).exists(), "pvhost's base cgroup was left behind"
    assert thread_allowed_cpus(tid) == before
