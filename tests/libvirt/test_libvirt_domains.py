"""libvirt-managed VMs for real: a private libvirtd, one TCG domain, the real pvhost and agent.

One domain of the test image (2 vCPUs, direct kernel boot, named with spaces, dots, unicode and
over 64 characters) runs for the whole module under a libvirtd this module starts and stops.
pvhost finds it through libvirt's events alone (its runtime directory stays empty), reads the
agent socket from the live XML and pins through libvirt: ``virsh vcpupin`` shows the pin and
libvirt's own vcpuN cpuset holds it. The tests run in file order and share the domain.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvhost.libvirt import safe_name
from tests.cpuacct import load_on, share
from tests.cpusets import CPUSET, scratch_cpuset
from vmlab.daemon import PvhostDaemon
from vmlab.errors import DaemonError
from vmlab.images import GuestImage, ensure_test_image, ensure_test_image_kernel61
from vmlab.libvirtd import Libvirtd, domain_xml
from vmlab.testhook import TestHook

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "extpv lab domain. É " + "x" * 50  # spaces, a dot, unicode, 70 characters
MACHINE = CPUSET / "machine"
PCPU = 1  # the pCPU the tests pin to; CPU 0 stays for housekeeping and the load


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
    def __init__(self, lv: Libvirtd, vm_dir: Path, domain: str = DOMAIN) -> None:
        self.lv, self.vm_dir, self.domain = lv, vm_dir, domain
        self.hook = TestHook(vm_dir / "test.sock", "lv")
        self.started_at = 0.0
        self.uuid = lv.virsh("domuuid", domain).stdout.strip()
        self.name = safe_name(domain, self.uuid)

    def guest(self, argv: list[str] | str, timeout_s: float = 60) -> Any:
        return self.hook.run(argv, timeout_s, "")

    def background(self, argv: list[str]) -> int:
        """Start a guest command without waiting; its guest pid."""
        return self.hook.background(argv, "/dev/null", 30)

    def vcpupin(self) -> dict[int, str]:
        out = self.lv.virsh("vcpupin", self.domain).stdout
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
def load_cpuset() -> Iterator[Path]:
    """A cpuset of ours on CPUs 0-1 standing for where the host's other load runs; pvhost's
    ``isolate_from`` names it, so every pin of these tests takes its pCPU from it."""
    with scratch_cpuset(f"extpv-lvtest-{os.getpid()}-load", "0-1") as path:
        yield path


@pytest.fixture(scope="module")
def pvhost(
    tmp_path_factory: pytest.TempPathFactory,
    libvirtd: Libvirtd,
    image: GuestImage,
    load_cpuset: Path,
) -> Iterator[PvhostDaemon]:
    work = tmp_path_factory.mktemp("pvhost")
    runtime = work / "vms"  # stays empty: every VM here comes from libvirt
    runtime.mkdir()
    daemon = PvhostDaemon(
        work,
        runtime,
        image.signing_key,
        extra_config=f'isolate_from = ["/{load_cpuset.name}"]\n'
        f'\n[libvirt]\nenabled = true\nuri = "{libvirtd.uri}"\nmax_backoff = 1.0\n',
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


def cpus(cpuset: Path) -> str:
    return (cpuset / "cpuset.cpus").read_text().strip()


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


@pytest.fixture
def yes_load(load_cpuset: Path) -> Iterator[list[int]]:
    """4x CPUs ``yes`` processes in the load cpuset (the paper's competing host load)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(4 * len(os.sched_getaffinity(0))):
            # Each in its own session: with autogroup scheduling a group of them would
            # otherwise count as one task against the vCPU.
            p = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True)
            (load_cpuset / "tasks").write_text(str(p.pid))
            procs.append(p)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.isolation
def test_c_isolate_from_takes_the_pinned_pcpu_from_the_load_and_gives_it_back(
    domain: Domain, pvhost: PvhostDaemon, load_cpuset: Path, yes_load: list[int]
) -> None:
    st = pvhost.wait_status("vCPU 1 known", lambda s: "1" in s["vms"][domain.name]["vcpus"], 30)
    tid = st["vms"][domain.name]["vcpus"]["1"]["tid"]
    assert load_on(yes_load, PCPU) > 0, "the load runs on the pCPU before the pin"
    spin = ["taskset", "-c", "1", "timeout", "120", "sh", "-c", "while :; do :; done"]
    gpid = domain.background(spin)
    try:
        pvhost.wait_status("vCPU 1 → pCPU 1 via libvirt", pinned_1(domain), 120)
        assert cpus(load_cpuset) == "0", "pCPU 1 withheld from the load's cpuset"
        assert domain.vcpupin()[1] == "1"
        time.sleep(0.2)  # the kernel moves the load off at its next scheduling point
        assert load_on(yes_load, PCPU) == 0, "a yes process ran on the pinned pCPU"
        pinned = share(tid)
        st = pvhost.status()
        status = st["backend_detail"]["isolation"]
        assert status["withheld"] == {"/" + load_cpuset.name: "0-1"}, status
        # What the pin achieved is read back, as for plain-QEMU VMs: the load's cpuset gave the
        # pCPU up; the tasks cgroup v1 leaves there (the root cpuset's) are what is named.
        placed = st["vms"][domain.name]["placements"]["1"]
        result = {r["vcpu"]: r for r in st["vms"][domain.name]["result"]}[1]
        for said in (placed, result):  # pvctl status, and what the guest was told
            assert said["isolation"] == "restricted", said
            why = said["isolation_reason"] or ""
            assert re.match(r"\d+ task\(s\) of the root cpuset may still run on its pCPU", why)
            assert f"/{load_cpuset.name} off it" in why, why
    finally:
        domain.guest(f"kill {gpid}").check()
    pvhost.wait_status("release", unpinned(domain), 120)
    assert cpus(load_cpuset) == "0-1", "given back exactly"
    assert pvhost.status()["backend_detail"]["isolation"]["withheld"] == {}
    time.sleep(0.2)
    assert load_on(yes_load, PCPU) > 0, "the load has the pCPU again"
    print(
        f"\n[libvirt] spinning vCPU's share of pCPU 1 while pinned: {pinned:.0%}", file=sys.stderr
    )
    assert pinned >= 0.8, f"the pinned vCPU thread got {pinned:.0%} of its pCPU"


@pytest.mark.isolation
def test_c_a_pin_that_would_empty_a_load_cpuset_is_refused_with_the_reason(
    domain: Domain, pvhost: PvhostDaemon, load_cpuset: Path
) -> None:
    (load_cpuset / "cpuset.cpus").write_text(str(PCPU))
    try:
        gpid = domain.background(["taskset", "-c", "1", "sleep", "600"])
        st = pvhost.wait_status("an answer for vCPU 1", answered(domain, 1), 120)
        result = {r["vcpu"]: r for r in st["vms"][domain.name]["result"]}[1]
        assert result.get("pcpu") is None, result
        assert "would leave it no CPU" in str(result), result
        assert cpus(load_cpuset) == str(PCPU), "nothing taken"
        assert domain.vcpupin() == {0: "0-1", 1: "0-1"}, "libvirt's pinning untouched"
        assert placements(st, domain.name) == {}
        domain.guest(f"kill {gpid}").check()
    finally:
        (load_cpuset / "cpuset.cpus").write_text("0-1")


def test_c_pvhost_killed_while_pinned_converges(
    domain: Domain, pvhost: PvhostDaemon, load_cpuset: Path
) -> None:
    gpid = domain.background(["taskset", "-c", "1", "sleep", "600"])
    pvhost.wait_status("vCPU 1 pinned", pinned_1(domain), 120)
    pvhost.kill(signal.SIGKILL)
    assert domain.vcpupin()[1] == "1", "the pin is libvirt's state: it holds while pvhost is gone"
    pvhost.start()
    pvhost.wait_status("the same pin after restart", pinned_1(domain), 120)
    assert domain.vcpupin()[1] == "1"
    assert cpus(load_cpuset) == "0", "the pCPU stays withheld from the load through the kill"
    domain.guest(f"kill {gpid}").check()
    pvhost.wait_status("release", unpinned(domain), 120)
    assert domain.vcpupin() == {0: "0-1", 1: "0-1"}
    assert cpus(load_cpuset) == "0-1", "given back exactly"


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


PLAY = """- name: The pvhost role's libvirt part
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Give libvirt domains the extpv channel
      ansible.builtin.include_role:
        name: pvhost
        tasks_from: libvirt
    - name: Keep what the role did
      ansible.builtin.copy:
        content: "{{ pvhost_libvirt_result | to_json }}"
        dest: "{{ result_file }}"
        mode: "0600"
      changed_when: false
      check_mode: false  # the test's own record, written also when the role runs --check
"""


def pvhost_role(tmp: Path, uri: str, domains: object, *, check: bool = False) -> Any:
    """Run the pvhost role's pvhost_libvirt_domains tasks on this host: (rc, changed tasks,
    output, the channel task's result)."""
    play, result = tmp / "play.yml", tmp / "result.json"
    play.write_text(PLAY)
    result.unlink(missing_ok=True)
    env = dict(
        os.environ,
        ANSIBLE_ROLES_PATH=str(REPO / "ansible" / "roles"),
        ANSIBLE_LIBRARY=str(REPO / "ansible" / "library"),
        ANSIBLE_LOCAL_TEMP=str(tmp),
        ANSIBLE_NOCOLOR="1",
    )
    extra = {
        "pvhost_libvirt_domains": domains,
        "pvhost_libvirt_uri": uri,
        "result_file": str(result),
        "ansible_python_interpreter": sys.executable,
    }
    playbook = str(Path(sys.executable).parent / "ansible-playbook")
    argv = [playbook, "-i", "localhost,", "-c", "local", str(play), "-e", json.dumps(extra)]
    if check:
        argv.append("--check")
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp, check=False
    )
    recap = re.search(r"localhost\s*:\s*ok=\d+\s+changed=(\d+)", proc.stdout)
    changed = int(recap.group(1)) if recap else -1
    done = json.loads(result.read_text()) if result.exists() else {}
    return proc.returncode, changed, proc.stdout + proc.stderr, done


def test_d_pvctl_and_the_ansible_role_enable_the_running_domain(
    domain: Domain, pvhost: PvhostDaemon, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    off = pvctl("libvirt", "disable", DOMAIN, "--uri", libvirtd.uri)
    assert off.returncode == 0, off.stderr
    assert "removed from the persistent XML and removed from the running domain" in off.stdout
    assert "org.extpv.agent.0" not in libvirtd.virsh("dumpxml", DOMAIN).stdout
    assert "org.extpv.agent.0" not in libvirtd.virsh("dumpxml", "--inactive", DOMAIN).stdout
    pvhost.wait_status("the domain dropped", lambda s: domain.name not in s["vms"], 60)

    # The role (pvhost_libvirt_domains) does the same, for this running domain and a defined,
    # stopped one; a second run changes nothing.
    idle = "extpv idle ø domain"
    xml = tmp_path / "idle.xml"
    xml.write_text(domain_xml(idle, Path("/nonexistent"), tmp_path, agent_channel=False))
    libvirtd.virsh("define", str(xml))
    try:
        rc, changed, out, done = pvhost_role(tmp_path, libvirtd.uri, "web-1")
        assert rc != 0
        assert "must be a list of libvirt domain names" in out, out
        rc, changed, out, done = pvhost_role(tmp_path, libvirtd.uri, [DOMAIN, "no such domain"])
        assert rc != 0
        assert "has no domain named 'no such domain'" in out, out
        rc, changed, out, done = pvhost_role(tmp_path, libvirtd.uri, [DOMAIN, idle])
        assert rc == 0 and changed == 1, out
        assert done["domains"] == {
            DOMAIN: ["channel added to the persistent XML", "channel added to the running domain"],
            idle: ["channel added to the persistent XML"],
        }
        assert "org.extpv.agent.0" in libvirtd.virsh("dumpxml", DOMAIN).stdout
        assert "org.extpv.agent.0" in libvirtd.virsh("dumpxml", "--inactive", DOMAIN).stdout
        assert "org.extpv.agent.0" in libvirtd.virsh("dumpxml", "--inactive", idle).stdout
        rc, changed, out, done = pvhost_role(tmp_path, libvirtd.uri, [DOMAIN, idle])
        assert rc == 0 and changed == 0, out
        assert done["domains"] == {DOMAIN: [], idle: []}
        # "all", in check mode (other domains this libvirt may know are not touched).
        rc, changed, out, done = pvhost_role(tmp_path, libvirtd.uri, "all", check=True)
        assert rc == 0, out
        assert done["domains"][DOMAIN] == [] and done["domains"][idle] == [], done
    finally:
        libvirtd.virsh("undefine", idle, check=False)
    again = pvctl("libvirt", "enable", DOMAIN, "--uri", libvirtd.uri)
    assert "already enabled" in again.stdout, "pvctl sees the role's channel as its own"

    # pvctl enable on the running domain.
    off = pvctl("libvirt", "disable", DOMAIN, "--uri", libvirtd.uri)
    assert off.returncode == 0, off.stderr
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
    domain: Domain, pvhost: PvhostDaemon, libvirtd: Libvirtd, load_cpuset: Path
) -> None:
    domain.background(["taskset", "-c", "1", "sleep", "600"])
    pvhost.wait_status("vCPU 1 pinned", pinned_1(domain), 120)
    assert cpus(load_cpuset) == "0"
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
    assert cpus(load_cpuset) == "0-1", "the destroyed domain's pCPU given back exactly"


HOTPLUG_DOMAIN = "extpv hot-plug domain"


@pytest.fixture
def hotplug_domain(libvirtd: Libvirtd, image: GuestImage, tmp_path: Path) -> Iterator[Domain]:
    """A second domain, with 1 vCPU of at most 2, booting Debian 12's 6.1 kernel (the test
    image's root file system, images/add-kernel). Under TCG, trixie's 6.12 takes no hot-added
    vCPU: since the stable fix of November 2025 it counts QEMU's hot-plug slots (the MADT's
    disabled LAPIC entries) only in a guest of a hypervisor it knows (KVM, Xen, Hyper-V,
    VMware ...), and TCG's CPUID signature is none of them ("0 hotplug CPUs" at boot)."""
    k61 = ensure_test_image_kernel61(REPO)
    xml = tmp_path / "hotplug.xml"
    xml.write_text(
        domain_xml(HOTPLUG_DOMAIN, k61.path, tmp_path, vcpus=1, max_vcpus=2, test_hook=True)
    )
    libvirtd.virsh("define", str(xml))
    dom = Domain(libvirtd, tmp_path, HOTPLUG_DOMAIN)
    try:
        libvirtd.virsh("start", HOTPLUG_DOMAIN)
        dom.hook.ping(300)
        yield dom
    finally:
        dom.hook.close()
        libvirtd.virsh("destroy", HOTPLUG_DOMAIN, check=False)
        libvirtd.virsh("undefine", HOTPLUG_DOMAIN, check=False)


def test_g_a_hotplugged_vcpu_is_followed_brought_online_by_the_guest_and_pinned(
    hotplug_domain: Domain, pvhost: PvhostDaemon
) -> None:
    """``virsh setvcpus --live`` (libvirt emits no event for it): pvhost sees the new vCPU in
    libvirt's new vcpu1 cgroup before the guest asks for anything; the image's udev rule brings
    the CPU online in the guest (nothing here writes to it); the guest's agent tells pvhost
    (``TopologyUpdate``; the agent is not restarted); a guest pin to it is placed on the new
    vCPU's thread, shown by ``virsh vcpupin`` and libvirt's vcpu1 cgroup, and released."""
    dom = hotplug_domain
    st = pvhost.wait_status(
        "the second domain's agent program loaded",
        lambda s: s["vms"].get(dom.name, {}).get("programs", {}).get("affinity") == "loaded",
        300,
    )
    assert set(st["vms"][dom.name]["vcpus"]) == {"0"}, "one vCPU of at most 2 runs"
    t0 = time.monotonic()
    dom.lv.virsh("setvcpus", HOTPLUG_DOMAIN, "2", "--live")
    st = pvhost.wait_status(
        "vCPU 1 known to pvhost with no guest request",
        lambda s: "1" in s["vms"][dom.name]["vcpus"],
        30,
    )
    print(f"\n[libvirt] setvcpus --live → vCPU map: {time.monotonic() - t0:.2f} s", file=sys.stderr)
    assert not st["vms"][dom.name]["result"], "no guest request went before"
    tid = st["vms"][dom.name]["vcpus"]["1"]["tid"]
    assert "/vcpu1\n" in Path(f"/proc/{tid}/cgroup").read_text()
    online = dom.guest(
        "f=/sys/devices/system/cpu/cpu1/online; for i in $(seq 300); do"
        ' [ "$(cat $f 2>/dev/null)" = 1 ] && break; sleep 0.1; done; cat $f; nproc'
    )
    assert online.stdout.split() == ["1", "2"], f"cpu1 online in the guest: {online}"
    print(f"[libvirt] setvcpus --live → online in the guest: {time.monotonic() - t0:.2f} s",
          file=sys.stderr)  # fmt: skip
    assert dom.vcpupin() == {0: "0-1", 1: "0-1"}
    # The guest's agent tells pvhost that CPU 1 came online (TopologyUpdate, protocol 5): the
    # host's affinity tracker follows it with no new handshake and no restart of the agent.
    st = pvhost.wait_status(
        "pvhost told CPU 1 is online in the guest",
        lambda s: s["vms"][dom.name].get("guest_online") == [0, 1],
        30,
    )
    print(f"[libvirt] setvcpus --live → pvhost told by the agent: {time.monotonic() - t0:.2f} s",
          file=sys.stderr)  # fmt: skip
    vm = st["vms"][dom.name]
    assert (vm["protocol_version"], vm["topology_changes"]) == (5, 1), vm
    assert vm["programs"].get("affinity") == "loaded", vm
    # One pin, made once: the agent and its program were there all along.
    t1 = time.monotonic()
    dom.background(["taskset", "-c", "1", "sleep", "20"])
    st = pvhost.wait_status("the new vCPU 1 → pCPU 1 via libvirt", pinned_1(dom), 18)
    print(f"[libvirt] pin to the hot-plugged vCPU → placed: {time.monotonic() - t1:.2f} s",
          file=sys.stderr)  # fmt: skip
    assert st["vms"][dom.name]["vcpus"]["1"]["tid"] == tid
    assert dom.vcpupin() == {0: "0-1", 1: "1"}
    assert os.sched_getaffinity(tid) == {1}
    vcpu1 = [p for p in MACHINE.glob("*/vcpu1") if str(tid) in (p / "tasks").read_text().split()]
    assert len(vcpu1) == 1, "the new vCPU's thread is in libvirt's vcpu1 cgroup"
    assert (vcpu1[0] / "cpuset.cpus").read_text().strip() == "1"
    pvhost.wait_status("release after the thread exited", unpinned(dom), 120)
    assert dom.vcpupin() == {0: "0-1", 1: "0-1"}
    assert os.sched_getaffinity(tid) == {0, 1}
