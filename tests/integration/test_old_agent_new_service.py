"""An agent built before services existed runs a new service unchanged (issue #12).

The agent is the code of the last commit before services as plugins (``PREVIOUS_AGENT``: its
pvagent, pvproto and extpv, taken from git), run as its daemon (``pvagent run --unix``) on
this host's kernel; pvhost is this checkout's, with a service the old agent never heard of
(``echobpf``, a test distribution on sys.path; its program is real eBPF). Between them a
byte relay plays QEMU's chardev. The old agent speaks protocol 2 and forwards the unknown ring
buffer's records as hex ``ProgramEvent``s; the new service must get every one, decoded.

Then the affinity service: a thread of this host (the old agent's "guest") pins itself, and
the old agent must read the new host's answer — whose placements, from protocol 4 on, carry
an ``isolation`` field the old agent's models would reject: the host leaves it out for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pvhost import signing
from pvhost.config import ServicesConfig
from pvhost.service import Service
from tests import plugindist
from tests.integration.hostrun import service_config
from vmlab import VirtualMachine

pytestmark = [pytest.mark.root, pytest.mark.ebpf, pytest.mark.vm]

ROOT = Path(__file__).resolve().parents[2]
#: The last commit whose agent predates services (protocol 2 only).
PREVIOUS_AGENT = "fef00c3"
#: The last commit whose agent tracks affinity itself (protocols 2 and 3).
TRACKING_AGENT = "8674d6d"
CALLS = 40


def old_agent(into: Path, commit: str = PREVIOUS_AGENT) -> Path:
    """The agent's packages as of ``commit``, extracted from git into ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "pvagent", "pvproto", "extpv"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.fail(f"cannot take the old agent from git: {archive.stderr.decode()[:300]}")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


@contextlib.asynccontextmanager
async def relay(host_side: Path, guest_side: Path) -> AsyncIterator[None]:
    """QEMU's chardev, played: the agent connects to ``guest_side``, pvhost to
    ``host_side``; bytes are copied both ways while both are connected."""
    guest: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    pumps: set[asyncio.Task[None]] = set()

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def on_guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await guest.put((r, w))

    async def on_host(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        gr, gw = await guest.get()
        for task in (pump(r, gw), pump(gr, w)):
            pumps.add(asyncio.create_task(task))

    servers = [
        await asyncio.start_unix_server(on_guest, str(guest_side)),
        await asyncio.start_unix_server(on_host, str(host_side)),
    ]
    try:
        yield
    finally:
        for server in servers:
            server.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def test_an_agent_older_than_services_runs_a_new_service(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = old_agent(tmp_path / "old")
    assert "SUPPORTED_VERSIONS: tuple[int, ...] = (2,)" in (old / "pvproto/version.py").read_text()
    monkeypatch.syspath_prepend(str(plugindist.install(tmp_path / "site")))
    obj = plugindist.build_echo(tmp_path, os.getpid())
    private, public = signing.generate_keypair(tmp_path / "keys")
    trusted = tmp_path / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    agent_config = tmp_path / "pvagent.toml"
    placement_file = tmp_path / "placement.json"
    agent_config.write_text(
        f'trusted_dir = "{trusted}"\nstate_dir = ""\nplacement_file = "{placement_file}"\n'
    )
    base = service_config(tmp_path, qemu, cpuset_group)
    config = base.model_copy(
        update={
            # affinity_program unset: the real compiled object (the old agent's own layout).
            "service": base.service.model_copy(
                update={"signing_key": private, "affinity_program": None}
            ),
            "services": ServicesConfig.model_validate(
                {"enabled": ["echobpf", "affinity"], "echobpf": {"object": str(obj)}}
            ),
        }
    )
    guest_sock = tmp_path / "guest.sock"

    async def scenario() -> None:
        async with relay(qemu.dir / "agent.sock", guest_sock):
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pvagent", "run", "--unix", str(guest_sock),
                "--config", str(agent_config),
                env={**os.environ, "PYTHONPATH": str(old)},
                cwd=old,  # `-m` puts the working directory first on sys.path
                stderr=open(tmp_path / "agent.log", "wb"),  # noqa: SIM115 - closed with the process
            )  # fmt: skip
            service = Service(config)
            await service.start()
            try:

                def vm() -> dict[str, object]:
                    return service.status()["vms"]["t"]  # type: ignore[no-any-return]

                async with asyncio.timeout(60):
                    while vm()["programs"] != {"echobpf": "loaded", "affinity": "loaded"}:
                        await asyncio.sleep(0.05)
                assert vm()["protocol_version"] == 2
                assert vm()["guest"] == "pvagent 0.1.0"
                for _ in range(CALLS):
                    os.getppid()
                async with asyncio.timeout(10):
                    while len(vm()["services"]["echobpf"]["status"]["events"]) < CALLS:  # type: ignore[index]
                        await asyncio.sleep(0.05)
                services = vm()["services"]
                assert services["echobpf"] == {  # type: ignore[index]
                    "state": "enabled",
                    "status": {"events": list(range(1, CALLS + 1))},
                }
                assert "_dropped" not in services  # type: ignore[operator]

                pinned = subprocess.Popen(["taskset", "-c", "1", "sleep", "60"])
                try:
                    async with asyncio.timeout(30):
                        while not _pinned_in(placement_file, vcpu=1):
                            await asyncio.sleep(0.05)
                    result = vm()["result"]  # before the pin goes away with the sleep
                finally:
                    pinned.kill()
                    pinned.wait()
                doc = json.loads(placement_file.read_text())
                # The old agent's own model: no isolation keys, and it parsed the answer.
                assert {"vcpu": 1, "pcpu": 1, "refused": None} in doc["placements"], doc
                assert all(set(p) == {"vcpu", "pcpu", "refused"} for p in doc["placements"])
                # The host knew what the pin achieved; it only left it out for this agent.
                (mine,) = [r for r in result if r["vcpu"] == 1]  # type: ignore[attr-defined]
                assert mine["isolation"] == "restricted", mine
                assert "bad-frame" not in (tmp_path / "agent.log").read_text()
            finally:
                await service.stop()
                agent.terminate()
                await asyncio.wait_for(agent.wait(), 15)

    try:
        asyncio.run(scenario())
    finally:
        print((tmp_path / "agent.log").read_text()[-3000:], file=sys.stderr)


#: Touches 256 MiB: far past the test's memory cgroup limit, so the kernel's OOM killer picks it.
_HOG = "import sys; x = b'\\x01' * (256 << 20); sys.exit(3)"


def _oom_killed_child(group: Path) -> tuple[int, int]:
    """Run _HOG in memory cgroup ``group`` (v1, 32 MiB, no swap): (pid, returncode)."""
    child = subprocess.Popen(  # the shell enters the group, then becomes the hog (same pid)
        ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable, _HOG]
    )
    return child.pid, child.wait(60)


@pytest.mark.memory
def test_an_agent_older_than_services_runs_the_memory_service(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """The memory service's real program, in the old agent, on this host's kernel: an OOM kill
    (a memory cgroup's, the one such event a shared host can produce safely: a host-wide
    direct reclaim would slow everyone's work) reaches the host service decoded, with the pid
    the kernel killed. The program's reclaim tracepoints load and attach alongside."""
    old = old_agent(tmp_path / "old")
    assert "SUPPORTED_VERSIONS: tuple[int, ...] = (2,)" in (old / "pvproto/version.py").read_text()
    assert not any("pv_memory" in p.read_text() for p in old.rglob("*.py"))  # knows nothing of it
    private, public = signing.generate_keypair(tmp_path / "keys")
    trusted = tmp_path / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    agent_config = tmp_path / "pvagent.toml"
    agent_config.write_text(f'trusted_dir = "{trusted}"\nstate_dir = ""\nplacement_file = ""\n')
    base = service_config(tmp_path, qemu, cpuset_group)
    config = base.model_copy(
        update={
            "service": base.service.model_copy(update={"signing_key": private}),
            "services": ServicesConfig.model_validate(
                {"enabled": ["memory"], "memory": {"min_mib": 64}}
            ),
        }
    )
    memcg = Path("/sys/fs/cgroup/memory") / f"extpv-oldagent-{os.getpid()}"
    guest_sock = tmp_path / "guest.sock"

    async def scenario() -> None:
        async with relay(qemu.dir / "agent.sock", guest_sock):
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pvagent", "run", "--unix", str(guest_sock),
                "--config", str(agent_config),
                env={**os.environ, "PYTHONPATH": str(old)},
                cwd=old,
                stderr=open(tmp_path / "agent.log", "wb"),  # noqa: SIM115 - closed with the process
            )  # fmt: skip
            service = Service(config)
            await service.start()
            try:

                def vm() -> dict[str, Any]:
                    return service.status()["vms"]["t"]  # type: ignore[no-any-return]

                def memory() -> dict[str, Any]:
                    return vm()["services"]["memory"]["status"]  # type: ignore[no-any-return]

                async with asyncio.timeout(60):
                    while vm()["programs"] != {"memory": "loaded"}:
                        await asyncio.sleep(0.05)
                assert vm()["protocol_version"] == 2
                assert memory()["configured_mib"] == 64
                pid, returncode = await asyncio.to_thread(_oom_killed_child, memcg)
                assert returncode == -signal.SIGKILL, "the kernel's OOM killer did not kill it"
                # The count rises when the event arrives; the decision is recorded after the
                # service has read the host's memory and answered QEMU: wait for both.
                async with asyncio.timeout(10):
                    while (status := memory())["oom_kills"] < 1 or not status["decisions"]:
                        await asyncio.sleep(0.05)
                assert status["oom_kills"] == 1 and status["last_oom_pid"] == pid, status
                assert "1 OOM kills" in status["decisions"][-1]["reason"], status
                assert "_dropped" not in vm()["services"]
            finally:
                await service.stop()
                agent.terminate()
                await asyncio.wait_for(agent.wait(), 15)

    memcg.mkdir()
    try:
        (memcg / "memory.limit_in_bytes").write_text(str(32 << 20))
        asyncio.run(scenario())
    finally:
        memcg.rmdir()
        print((tmp_path / "agent.log").read_text()[-3000:], file=sys.stderr)


def test_a_protocol_3_agent_still_gets_its_pins_placed(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    old = old_agent(tmp_path / "old", TRACKING_AGENT)
    assert (
        "SUPPORTED_VERSIONS: tuple[int, ...] = (2, 3)" in (old / "pvproto/version.py").read_text()
    )
    private, public = signing.generate_keypair(tmp_path / "keys")
    trusted = tmp_path / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    placement = tmp_path / "placement.json"
    agent_config = tmp_path / "pvagent.toml"
    agent_config.write_text(
        f'trusted_dir = "{trusted}"\nstate_dir = ""\nplacement_file = "{placement}"\n'
    )
    base = service_config(tmp_path, qemu, cpuset_group)
    config = base.model_copy(
        update={
            "service": base.service.model_copy(
                update={"signing_key": private, "affinity_program": None}  # the built object
            ),
        }
    )
    guest_sock = tmp_path / "guest.sock"
    cpu = sorted(os.sched_getaffinity(0))[-1]  # the agent's "guest" CPUs are this machine's

    async def scenario() -> None:
        async with relay(qemu.dir / "agent.sock", guest_sock):
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pvagent", "run", "--unix", str(guest_sock),
                "--config", str(agent_config),
                env={**os.environ, "PYTHONPATH": str(old)},
                cwd=old,
                stderr=open(tmp_path / "agent.log", "wb"),  # noqa: SIM115 - closed with the process
            )  # fmt: skip
            service = Service(config)
            await service.start()
            stop = threading.Event()
            pinned = threading.Thread(
                target=lambda: (os.sched_setaffinity(0, {cpu}), stop.wait(60))
            )
            try:

                def vm() -> dict[str, object]:
                    return service.status()["vms"]["t"]  # type: ignore[no-any-return]

                async with asyncio.timeout(60):
                    while vm()["programs"] != {"affinity": "loaded"}:
                        await asyncio.sleep(0.05)
                assert vm()["protocol_version"] == 3
                await asyncio.sleep(1)  # threads of this machine pinned before (other work)
                before = list(service.vms["t"].wanted)
                pinned.start()
                async with asyncio.timeout(20):  # its AffinityUpdate, placed
                    while service.backend.pins().get("t", {}).get(cpu) != cpu:
                        await asyncio.sleep(0.05)
                assert cpu in service.vms["t"].wanted
                affinity = vm()["services"]["affinity"]["status"]  # type: ignore[index]
                assert affinity["tracker"] == {"where": "guest"}
                async with asyncio.timeout(10):  # and its AffinityResult, as it always did
                    while not placement.exists() or f'"pcpu": {cpu}' not in placement.read_text():
                        await asyncio.sleep(0.05)
                stop.set()
                pinned.join()
                if cpu not in before:  # (else another thread of this machine still wants it)
                    async with asyncio.timeout(20):  # the thread exited: released
                        while cpu in service.vms["t"].wanted:
                            await asyncio.sleep(0.05)
            finally:
                stop.set()
                if pinned.is_alive():
                    pinned.join()
                await service.stop()
                agent.terminate()
                await asyncio.wait_for(agent.wait(), 15)

    try:
        asyncio.run(scenario())
    finally:
        print((tmp_path / "agent.log").read_text()[-3000:], file=sys.stderr)


def _pinned_in(placement_file: Path, vcpu: int) -> bool:
    """The guest's placement file has a pCPU for ``vcpu``."""
    try:
        doc = json.loads(placement_file.read_text())
    except (OSError, ValueError):
        return False
    return any(p.get("vcpu") == vcpu and p.get("pcpu") is not None for p in doc["placements"])
