"""libvirt-managed VMs for real: a private libvirtd, one TCG domain, the real pvhost and agent.

One domain of the test image (2 vCPUs, direct kernel boot, named with spaces, dots, unicode and
over 64 characters) runs for the whole module under a libvirtd this module starts and stops.
pvhost finds it through libvirt's events alone (its runtime directory stays empty), reads the
agent socket from the live XML and pins through libvirt: ``virsh vcpupin`` shows the pin and
libvirt's own vcpuN cpuset holds it. The tests run in file order and share the domain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvhost.libvirt import safe_name
from vmlab.daemon import PvhostDaemon
from vmlab.errors import DaemonError
from vmlab.images import GuestImage, ensure_test_image
from vmlab.libvirtd import Libvirtd, domain_xml
from vmlab.testhook import TestHook

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "extpv lab domain. É " + "x" * 50  # spaces, a dot, unicode, 70 characters
MACHINE = Path("/sys/fs/cgroup/cpuset/machine")


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return ensure_test_image(REPO)


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    daemon = Libvirtd(tmp_path_factory.mktemp("libvirtd"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


class Domain:
    def __init__(self, lv: Libvirtd, vm_dir: Path) -> None:
        self.lv, self.vm_dir = lv, vm_dir
        self.hook = TestHook(vm_dir / "test.sock", "lv")
        self.started_at = 0.0
        self.uuid = lv.virsh("domuuid", DOMAIN).stdout.strip()
        self.name = safe_name(DOMAIN, self.uuid)

    def guest(self, argv: list[str] | str, timeout_s: float = 60) -> Any:
        return self.hook.run(argv, timeout_s, "")

    def background(self, argv: list[str]) -> int:
        """Start a guest command without waiting; its guest pid."""
        return self.hook.background(argv, "/dev/null", 30)

    def vcpupin(self) -> dict[int, str]:
        out = self.lv.virsh("vcpupin", DOMAIN).stdout
        pins = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit():
                pins[int(parts[0])] = parts[1]
        return pins


@pytest.fixture(scope="module")
def domain(
    libvirtd: Libvirtd, image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Domain]:
    vm_dir = tmp_path_factory.mktemp("domain")
    xml = vm_dir / "domain.xml"
    xml.write_text(domain_xml(DOMAIN, image.path, vm_dir, vcpus=2, test_hook=True))
    libvirtd.virsh("define", str(xml))
    dom = Domain(libvirtd, vm_dir)
    try:
        dom.started_at = time.monotonic()
        libvirtd.virsh("start", DOMAIN)
        dom.hook.ping(300)
        yield dom
    finally:
        dom.hook.close()
        libvirtd.virsh("destroy", DOMAIN, check=False)
        libvirtd.virsh("undefine", DOMAIN, check=False)


@pytest.fixture(scope="module")
def pvhost(
    tmp_path_factory: pytest.TempPathFactory, libvirtd: Libvirtd, image: GuestImage
) -> Iterator[PvhostDaemon]:
    work = tmp_path_factory.mktemp("pvhost")
    runtime = work / "vms"  # stays empty: every VM here comes from libvirt
    runtime.mkdir()
    daemon = PvhostDaemon(
        work,
        runtime,
        image.signing_key,
        extra_config=f'\n[libvirt]\nenabled = true\nuri = "{libvirtd.uri}"\nmax_backoff = 1.0\n',
    )
    daemon.start()
    yield daemon
    daemon.close()


def placements(status: dict[str, Any], name: str) -> dict[int, int]:
    vm = status["vms"].get(name, {})
    return {int(v): p["pcpu"] for v, p in vm.get("placements", {}).items()}


def pinned_1(domain: Domain) -> Any:
    return lambda s: placements(s, domain.name) == {1: 1}


def answered(domain: Domain, vcpu: int) -> Any:
    return lambda s: any(r["vcpu"] == vcpu for r in s["vms"][domain.name]["result"])


def unpinned(domain: Domain) -> Any:
    return lambda s: not placements(s, domain.name)


def test_a_domain_found_and_agent_program_loaded(domain: Domain, pvhost: PvhostDaemon) -> None:
    st = pvhost.wait_status(
        "the domain found through libvirt, its agent's program loaded",
        lambda s: s["vms"].get(domain.name, {}).get("programs", {}).get("affinity") == "loaded",
        300,
    )
    took = time.monotonic() - domain.started_at
    print(f"\n[libvirt] domain start → affinity program loaded: {took:.1f} s", file=sys.stderr)
    assert st["libvirt"]["state"] == "connected"
    assert st["libvirt"]["domains"] == {domain.name: DOMAIN}
    vm = st["vms"][domain.name]
    assert vm["channel"] == "connected"
    assert set(vm["vcpus"]) == {"0", "1"}
    # The vCPU threads are the ones libvirt keeps in its own vcpuN cgroups.
    for v, info in vm["vcpus"].items():
        cg = Path(f"/proc/{info['tid']}/cgroup").read_text()
        assert f"/vcpu{v}\n" in cg, cg


def test_b_guest_pin_shows_in_virsh_vcpupin_and_thread_exit_releases(
    domain: Domain, pvhost: PvhostDaemon
) -> None:
    before = domain.vcpupin()
    assert before == {0: "0-1", 1: "0-1"}, before
    t0 = time.monotonic()
    domain.background(["taskset", "-c", "1", "sleep", "15"])
    try:
        st = pvhost.wait_status("an answer for vCPU 1", answered(domain, 1), 120)
    except DaemonError as err:
        journal = domain.guest(["journalctl", "-b", "-u", "pvagent", "-o", "cat", "--no-pager"])
        raise AssertionError(f"{err}\nguest agent's journal:\n{journal.stdout[-3000:]}") from err
    result = {r["vcpu"]: r for r in st["vms"][domain.name]["result"]}
    assert result[1]["pcpu"] == 1, result[1]
    st = pvhost.wait_status("vCPU 1 → pCPU 1 via libvirt", pinned_1(domain), 30)
    print(f"\n[libvirt] guest pin → placed: {time.monotonic() - t0:.2f} s", file=sys.stderr)
    assert domain.vcpupin() == {0: "0-1", 1: "1"}
    tid = st["vms"][domain.name]["vcpus"]["1"]["tid"]
    assert os.sched_getaffinity(tid) == {1}
    vcpu1 = [p for p in MACHINE.glob("*/vcpu1") if str(tid) in (p / "tasks").read_text().split()]
    assert len(vcpu1) == 1, "vCPU 1's thread is in libvirt's vcpu1 cgroup"
    assert (vcpu1[0] / "cpuset.cpus").read_text().strip() == "1"
    # The guest's thread exits: the pin is undone and libvirt's previous pinning is back.
    pvhost.wait_status("release after the thread exited", unpinned(domain), 120)
    assert domain.vcpupin() == before
    assert os.sched_getaffinity(tid) == {0, 1}


def test_c_pvhost_killed_while_pinned_converges(domain: Domain, pvhost: PvhostDaemon) -> None:
    gpid = domain.background(["taskset", "-c", "1", "sleep", "600"])
    pvhost.wait_status("vCPU 1 pinned", pinned_1(domain), 120)
    pvhost.kill(signal.SIGKILL)
    assert domain.vcpupin()[1] == "1", "the pin is libvirt's state: it holds while pvhost is gone"
    pvhost.start()
    pvhost.wait_status("the same pin after restart", pinned_1(domain), 120)
    assert domain.vcpupin()[1] == "1"
    domain.guest(f"kill {gpid}").check()
    pvhost.wait_status("release", unpinned(domain), 120)
    assert domain.vcpupin() == {0: "0-1", 1: "0-1"}


def test_c_libvirtd_restarted_while_pinned_converges(
    domain: Domain, pvhost: PvhostDaemon, libvirtd: Libvirtd
) -> None:
    gpid = domain.background(["taskset", "-c", "1", "sleep", "600"])
    pvhost.wait_status("vCPU 1 pinned", pinned_1(domain), 120)
    libvirtd.stop_daemon()
    # pvhost says libvirt is gone, keeps the domain (its QEMU runs on) and its pin.
    st = pvhost.wait_status(
        "libvirt reported unreachable", lambda s: s["libvirt"]["state"] != "connected", 60
    )
    assert placements(st, domain.name) == {1: 1}
    assert st["vms"][domain.name]["channel"] == "connected"
    libvirtd.start_daemon()
    pvhost.wait_status("reconnected", lambda s: s["libvirt"]["state"] == "connected", 60)
    assert domain.vcpupin()[1] == "1", "libvirt kept the live pin through its restart"
    domain.guest(f"kill {gpid}").check()
    pvhost.wait_status("release through the new connection", unpinned(domain), 120)
    assert domain.vcpupin() == {0: "0-1", 1: "0-1"}


def pvctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvhost.ctl", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip


def test_d_pvctl_libvirt_disable_and_enable_on_the_running_domain(
    domain: Domain, pvhost: PvhostDaemon, libvirtd: Libvirtd
) -> None:
    off = pvctl("libvirt", "disable", DOMAIN, "--uri", libvirtd.uri)
    assert off.returncode == 0, off.stderr
    assert "removed from the persistent XML and removed from the running domain" in off.stdout
    assert "org.extpv.agent.0" not in libvirtd.virsh("dumpxml", DOMAIN).stdout
    assert "org.extpv.agent.0" not in libvirtd.virsh("dumpxml", "--inactive", DOMAIN).stdout
    pvhost.wait_status("the domain dropped", lambda s: domain.name not in s["vms"], 60)
    on = pvctl("libvirt", "enable", DOMAIN, "--uri", libvirtd.uri)
    assert on.returncode == 0, on.stderr
    assert "added to the persistent XML and added to the running domain" in on.stdout
    again = pvctl("libvirt", "enable", DOMAIN, "--uri", libvirtd.uri)
    assert "already enabled" in again.stdout
    # libvirt chose the socket path of the hot-attached channel; pvhost read it from the XML.
    pvhost.wait_status(
        "the domain back with a connected agent",
        lambda s: s["vms"].get(domain.name, {}).get("programs", {}).get("affinity") == "loaded",
        180,
    )
    domain.background(["taskset", "-c", "1", "sleep", "10"])
    pvhost.wait_status("vCPU 1 pinned again", pinned_1(domain), 120)
    assert domain.vcpupin()[1] == "1"
    pvhost.wait_status("release", unpinned(domain), 120)


def test_e_unknown_domain_is_a_clear_error(libvirtd: Libvirtd) -> None:
    out = pvctl("libvirt", "enable", "no such domain", "--uri", libvirtd.uri)
    assert out.returncode != 0
    assert "libvirt has no domain named 'no such domain'" in out.stderr


def test_f_virsh_destroy_leaves_no_extpv_state(
    domain: Domain, pvhost: PvhostDaemon, libvirtd: Libvirtd
) -> None:
    domain.background(["taskset", "-c", "1", "sleep", "600"])
    pvhost.wait_status("vCPU 1 pinned", pinned_1(domain), 120)
    libvirtd.virsh("destroy", DOMAIN)
    st = pvhost.wait_status(
        "the domain gone from pvhost",
        lambda s: domain.name not in s["vms"] and not s["orphans"],
        60,
    )
    assert st["libvirt"]["domains"] == {}
    state = pvhost.workdir / "state" / "libvirt.json"
    assert not state.exists() or domain.name not in state.read_text()
    # Placement went through libvirt alone: extpv made no cgroup for the domain.
    assert not (MACHINE.parent / pvhost.group / f"vm-{domain.name}").exists()
