"""Services as plugins on the real host service (issue #12): real QEMU, real cgroup v1
cpusets, the guest played on the channel socket (vmlab.guestpeer, the named fake peer).

The test services are a real distribution on ``sys.path`` (tests/plugindist.py), found by
``importlib.metadata`` like any installed third-party service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pvhost.config import ServicesConfig
from pvproto import AffinityUpdate, Error, LoadProgram, ProgramEvent, UnloadProgram
from tests import plugindist
from tests.integration.hostrun import (
    daemon_and_guest,
    free_port,
    served,
    service_config,
    write_config,
)
from vmlab import VirtualMachine

pytestmark = [pytest.mark.root, pytest.mark.vm]


def _record(value: int) -> ProgramEvent:
    return ProgramEvent(
        program_id="echo", seq=value, data={"raw": value.to_bytes(8, "little").hex()}
    )


async def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def test_a_broken_service_is_disabled_for_its_vm_and_harms_nothing_else(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(plugindist.install(tmp_path / "site")))
    services = ServicesConfig(enabled=["affinity", *plugindist.PLUGINS], hook_timeout=0.5)
    config = service_config(tmp_path, qemu, cpuset_group).model_copy(update={"services": services})

    async def scenario() -> None:
        async with served(config, qemu.dir / "agent.sock") as (service, guest):
            loads = {(await guest.expect(LoadProgram)).program_id for _ in range(5)}  # type: ignore[attr-defined]
            # nonsense returned nonsense from programs(): nothing of it was injected.
            assert loads == {"affinity", "echo", "raising", "hanging", "badstatus"}
            # raising raised in on_ready: disabled for this VM, its program unloaded.
            unload = await guest.expect(UnloadProgram)
            assert isinstance(unload, UnloadProgram) and unload.program_id == "raising"

            guest.send(_record(7))
            guest.send(ProgramEvent(program_id="echo", seq=8, data={"raw": "abcd"}))  # 2 bytes
            guest.send(ProgramEvent(program_id="echo", seq=9, data={"raw": "not hex"}))
            guest.send(ProgramEvent(program_id="nobody", seq=10, data={"raw": "00"}))
            guest.send(ProgramEvent(program_id="hanging", seq=11, data={"raw": "00"}))
            guest.send(_record(12))
            # hanging never returns from on_events: disabled after hook_timeout.
            unload = await guest.expect(UnloadProgram)
            assert isinstance(unload, UnloadProgram) and unload.program_id == "hanging"

            # Affinity, in the same VM, is unaffected.
            result = await guest.update(1, [1])
            assert result.placements[0].pcpu == 1, result

            def echoed() -> list[int]:
                return service.status()["vms"]["t"]["services"]["echo"]["status"]["events"]

            await _until(lambda: echoed() == [7, 12])
            states = service.status()["vms"]["t"]["services"]
            assert states["raising"]["state"] == (
                "failed: on_ready raised RuntimeError: on_ready of a broken service"
            )
            assert states["hanging"]["state"] == "failed: on_events did not finish within 0.5 s"
            assert states["nonsense"]["state"] == (
                "failed: programs returned str, not a sequence of SignedProgram"
            )
            # badstatus returned an object that is no JSON from status(): failed on the spot.
            assert states["badstatus"]["state"] == "failed: status returned dict, not a JSON object"
            unload = await guest.expect(UnloadProgram)
            assert isinstance(unload, UnloadProgram) and unload.program_id == "badstatus"
            assert states["echo"] == {"state": "enabled", "status": {"events": [7, 12], "ready": 1}}
            assert states["affinity"]["state"] == "enabled"
            assert states["_dropped"] == {"layout": 2, "unclaimed": 1}
            json.dumps(service.status())  # the whole status is still JSON

            listed = service.service_list()["services"]
            assert listed["noimport"]["usable"] is False
            assert "DoesNotExist" in listed["noimport"]["error"]
            assert listed["echo"]["usable"] and listed["echo"]["origin"].startswith(
                "extpv-test-services 0.1"
            )

            metrics = service.metrics.render().decode()
            assert 'extpv_service_value{name="events",service="echo"} 2.0' in metrics
            assert 'extpv_service_failures_total{service="hanging"} 1.0' in metrics
            assert 'extpv_service_dropped_total{reason="layout",vm="t"} 2.0' in metrics

            # Still served after all that: a new request, and the echo service's records.
            result = await guest.update(2, [])
            assert result.placements == []
            guest.send(_record(13))
            await _until(lambda: echoed() == [7, 12, 13])
            assert guest.bad_frames == []

    asyncio.run(scenario())


def test_pvctl_disables_and_enables_a_service_for_a_vm(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    config = write_config(tmp_path, qemu, cpuset_group, free_port())

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):
            await guest.expect(LoadProgram)
            result = await guest.update(1, [1])
            pcpu = result.placements[0].pcpu
            assert pcpu is not None, result

            rc, out = await daemon.pvctl("service", "list")
            assert rc == 0, out
            assert out.splitlines()[0].split()[:2] == ["affinity", "default"], out
            assert "VM t: affinity enabled" in out

            rc, out = await daemon.pvctl("service", "disable", "t", "affinity")
            assert (rc, out.strip()) == (0, "VM t: service affinity disabled (was enabled)")
            unload = await guest.expect(UnloadProgram)
            assert isinstance(unload, UnloadProgram) and unload.program_id == "affinity"
            status = json.loads((await daemon.pvctl("status", "--json"))[1])["vms"]["t"]
            assert status["placements"] == {} and status["services"]["affinity"] == {
                "state": "disabled"
            }
            guest.send(update := AffinityUpdate(seq=2, wanted=[1], request_id=2))
            error = await guest.expect(Error)
            assert isinstance(error, Error) and error.request_id == update.request_id
            assert "the affinity service is not enabled for VM t" in error.message

            rc, out = await daemon.pvctl("service", "enable", "t", "nosuch")
            assert rc != 0 and "no service named 'nosuch' (installed: affinity, memory)" in out

            rc, out = await daemon.pvctl("service", "enable", "t", "affinity")
            assert (rc, out.strip()) == (0, "VM t: service affinity enabled (was disabled)")
            load = await guest.expect(LoadProgram)
            assert isinstance(load, LoadProgram) and load.program_id == "affinity"
            result = await guest.update(3, [1])
            assert result.placements[0].pcpu is not None, result
            await daemon.stop()
            assert daemon.returncode == 0, daemon.log()

    asyncio.run(scenario())


def test_a_service_enabled_at_runtime_has_its_programs_verdict_recorded(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """`pvctl service enable` injects the service's program into the connected guest; the
    guest's answer is the verdict on it (`pvctl status`: loaded), not one on a program the
    host never sent (once dropped so: the program showed as nothing, its on_loaded never ran).
    """
    config = write_config(tmp_path, qemu, cpuset_group, free_port())

    async def scenario() -> None:
        async with daemon_and_guest(tmp_path, config, qemu.dir / "agent.sock") as (daemon, guest):

            async def status() -> dict[str, Any]:
                rc, out = await daemon.pvctl("status", "--json")
                assert rc == 0, out
                return json.loads(out)["vms"]["t"]  # type: ignore[no-any-return]

            await guest.expect(LoadProgram)
            rc, out = await daemon.pvctl("service", "disable", "t", "affinity")
            assert rc == 0, out
            await guest.expect(UnloadProgram)
            assert (await status())["programs"] == {}
            rc, out = await daemon.pvctl("service", "enable", "t", "affinity")
            assert rc == 0, out
            load = await guest.expect(LoadProgram)
            assert isinstance(load, LoadProgram) and load.program_id == "affinity"
            async with asyncio.timeout(10):  # the fake guest answered it at once
                while (await status())["programs"] != {"affinity": "loaded"}:
                    await asyncio.sleep(0.1)
            assert "never sent" not in daemon.log()
            result = await guest.update(1, [1])
            assert result.placements[0].pcpu is not None, result
            await daemon.stop()
            assert daemon.returncode == 0, daemon.log()

    asyncio.run(scenario())
