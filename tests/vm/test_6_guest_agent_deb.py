"""The agent for existing guests: a stock Debian 12 guest gets the .deb from the Ansible role,
then a guest thread's pin places its vCPU through a real pvhost.

Real parts only: the package built by ``packaging/build-deb``; a stock bookworm image with no
extpv in it (``images/build-stock-image``: Debian's kernel, systemd, python3, openssh-server;
apt resolves the package's dependencies from a local copy of the archive's own .debs, because
the VM has no network); ``ansible-playbook ansible/guests.yml`` (the ``guest_agent`` role) over
real SSH to the guest, forwarded from a loopback port (QEMU user networking, ``restrict=on``):
how an operator reaches a guest, and the only way into one that has no test hook; this
checkout's pvhost daemon on this host (cgroup v1 cpusets here), QEMU with its virtio-serial
port. One VM for the module; the tests run in file order on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.debbuild import build_deb
from vmlab import VirtualMachine, VMSpec, start
from vmlab.daemon import PvhostDaemon
from vmlab.errors import ImageError
from vmlab.images import StockImage, ensure_stock_image

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VM = "stock"
KEY_IN_GUEST = "/etc/pvagent/trusted.d/extpv-host.pem"


def allowed(tid: int) -> str:
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def placements(status: dict[str, Any]) -> dict[int, int]:
    return {int(v): int(p["pcpu"]) for v, p in status["vms"][VM]["placements"].items()}


class Guest:
    """Root on the stock guest over SSH (127.0.0.1:port → guest:22), as Ansible reaches it."""

    def __init__(self, port: int, key: Path) -> None:
        self.port, self.key = port, key
        self.opts = [
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            "-i", str(key),
        ]  # fmt: skip

    def run(self, cmd: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *self.opts, "-p", str(self.port), "root@127.0.0.1", cmd],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip

    def out(self, cmd: str) -> str:
        res = self.run(cmd)
        assert res.returncode == 0, f"guest: {cmd!r} exited {res.returncode}: {res.stderr}"
        return res.stdout

    def wait_ssh(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while True:
            res = self.run("true", timeout_s=30)
            if res.returncode == 0:
                return
            if time.monotonic() > end:
                raise AssertionError(f"no SSH into the guest within {deadline_s:.0f} s: {res}")
            time.sleep(2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stock_image() -> StockImage:
    t0 = time.monotonic()
    try:
        image = ensure_stock_image(REPO, "bookworm")
    except ImageError as err:
        pytest.fail(str(err), pytrace=False)
    print(f"\n[deb] stock image ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return image


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh signing key pair, made as an operator makes it (``pvctl keygen``)."""
    d = tmp_path_factory.mktemp("keys")
    res = subprocess.run(
        [sys.executable, "-m", "pvhost.ctl", "keygen", str(d)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return d


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[Path]:
    d = Path("/run/extpv-test") / f"{os.getpid()}-deb" / "vms"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    for p in (d, d.parent):
        with contextlib.suppress(OSError):
            p.rmdir()


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path, keys: Path
) -> Iterator[PvhostDaemon]:
    d = PvhostDaemon(
        tmp_path_factory.mktemp("pvhost"), runtime_dir, keys / "signing.key",
        group=f"extpv-deb-{os.getpid()}",
    )  # fmt: skip
    d.start()
    yield d
    d.close()


@pytest.fixture(scope="module")
def vm(
    stock_image: StockImage, runtime_dir: Path, daemon: PvhostDaemon
) -> Iterator[VirtualMachine]:
    spec = VMSpec(
        name=VM, image=stock_image.path, smp=2, memory_mib=1024,
        runtime_dir=runtime_dir, ssh_port=_free_port(),
    )  # fmt: skip
    t0 = time.monotonic()
    machine = start(spec, deadline_s=300, retries=2)
    try:
        print(f"\n[deb] booted {machine} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield machine
    finally:
        machine.stop()


@pytest.fixture(scope="module")
def guest(vm: VirtualMachine, stock_image: StockImage) -> Guest:
    assert vm.spec.ssh_port is not None
    g = Guest(vm.spec.ssh_port, stock_image.ssh_key)
    g.wait_ssh(120)
    return g


def playbook(
    guest: Guest, tmp_path: Path, deb: Path, key: Path
) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook ansible/guests.yml`` with an inventory whose ``guests`` is the VM."""
    inventory = tmp_path / "guests.yml"
    inventory.write_text(
        "guests:\n  hosts:\n    stock:\n"
        "      ansible_host: 127.0.0.1\n"
        f"      ansible_port: {guest.port}\n"
        "      ansible_user: root\n"
        f"      ansible_ssh_private_key_file: {guest.key}\n"
        "      ansible_ssh_common_args: -o StrictHostKeyChecking=no"
        " -o UserKnownHostsFile=/dev/null\n"
        "      ansible_python_interpreter: /usr/bin/python3\n"
    )
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible"))
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    t0 = time.monotonic()
    res = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "ansible/guests.yml",
         "-e", f"guest_agent_deb={deb}", "-e", f"guest_agent_trusted_key={key}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    print(f"\n[deb] ansible-playbook: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return res


def test_a_role_installs_the_package_into_the_stock_guest_and_the_agent_connects(
    guest: Guest, daemon: PvhostDaemon, deb: Path, keys: Path, tmp_path: Path
) -> None:
    # Stock: no extpv, no pydantic at all (Debian 12's would be 1.x anyway).
    assert guest.run("dpkg -s pvagent").returncode != 0
    assert guest.run("python3 -c 'import pydantic'").returncode != 0
    assert guest.out("ls /dev/virtio-ports").split() == ["org.extpv.agent.0"]

    res = playbook(guest, tmp_path, deb, keys / "signing.pem")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]

    assert "Status: install ok installed" in guest.out("dpkg -s pvagent")
    assert guest.out("systemctl is-enabled pvagent.service").strip() == "enabled"
    assert guest.out(f"cat {KEY_IN_GUEST}") == (keys / "signing.pem").read_text()
    # The agent runs on the pydantic 2 the package carries, not on a Debian one.
    assert guest.run("dpkg -s python3-pydantic").returncode != 0
    st = daemon.wait_status(
        "Hello and the signed affinity program loaded by the packaged agent",
        lambda s: s["vms"][VM]["programs"] == {"affinity": "loaded"},
        deadline_s=180,
    )
    assert st["vms"][VM]["guest"], "the guest's Hello (software version) is recorded"
    assert guest.out("systemctl is-active pvagent.service").strip() == "active"


def test_b_second_run_changes_nothing(guest: Guest, deb: Path, keys: Path, tmp_path: Path) -> None:
    res = playbook(guest, tmp_path, deb, keys / "signing.pem")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    recap = res.stdout[res.stdout.rfind("PLAY RECAP") :]
    assert "changed=0" in recap and "failed=0" in recap, recap


def test_c_guest_pin_places_its_vcpu_through_pvhost(
    vm: VirtualMachine, guest: Guest, daemon: PvhostDaemon
) -> None:
    tids = {i: t.tid for i, t in vm.vcpu_threads().items()}
    before = allowed(tids[1])
    # A guest process pins itself to vCPU 1 (sched_setaffinity, then exec sleep).
    pid = guest.out("nohup taskset -c 1 sleep 600 >/dev/null 2>&1 & echo $!").strip()
    st = daemon.wait_status(
        "vCPU 1 → pCPU 1 for the guest's pin",
        lambda s: s["vms"][VM]["wanted"] == [1] and placements(s) == {1: 1},
        deadline_s=120,
    )
    assert allowed(tids[1]) == "1"
    assert st["vms"][VM]["vcpus"]["1"]["tid"] == tids[1]
    # The guest got the AffinityResult: its agent publishes the placement.
    end = time.monotonic() + 60
    while True:
        text = guest.run("cat /run/pvagent/placement.json").stdout
        got = {p["vcpu"]: p["pcpu"] for p in json.loads(text)["placements"]} if text else {}
        if 1 in got:
            break
        assert time.monotonic() < end, f"no placement of vCPU 1 in the guest: {text!r}"
        time.sleep(0.5)
    assert got[1] == 1
    guest.out(f"kill {shlex.quote(pid)}")
    daemon.wait_status(
        "release after the pinned process exited",
        lambda s: s["vms"][VM]["wanted"] == [] and placements(s) == {},
        deadline_s=120,
    )
    assert allowed(tids[1]) == before


def test_d_removal_stops_the_agent_and_leaves_the_key(guest: Guest, keys: Path) -> None:
    guest.out("apt-get remove -y -qq pvagent")
    assert guest.run("systemctl is-active pvagent.service").stdout.strip() != "active"
    assert guest.run("test -e /usr/lib/pvagent").returncode != 0
    guest.out("apt-get purge -y -qq pvagent")
    assert guest.out(f"cat {KEY_IN_GUEST}") == (keys / "signing.pem").read_text()


def test_e_apt_install_by_hand_as_the_docs_say(
    guest: Guest, daemon: PvhostDaemon, keys: Path
) -> None:
    # docs/guest-agent.md, "Install it by hand", verbatim (the role left the .deb in /var/tmp).
    res = subprocess.run(
        ["scp", *guest.opts, "-P", str(guest.port), str(keys / "signing.pem"),
         "root@127.0.0.1:/var/tmp/signing.pem"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    guest.out(
        "cd /var/tmp && apt install -y ./pvagent_*_amd64.deb"
        " && install -m 0644 signing.pem /etc/pvagent/trusted.d/extpv-host.pem"
        " && systemctl restart pvagent.service"
    )
    assert guest.out("systemctl is-active pvagent.service").strip() == "active"
    end = time.monotonic() + 120
    while True:
        invocation = guest.out("systemctl show -P InvocationID pvagent.service").strip()
        log = guest.out(f"journalctl -o cat _SYSTEMD_INVOCATION_ID={invocation}")
        if "host said hello" in log:
            break
        assert time.monotonic() < end, f"the reinstalled agent never greeted the host:\n{log}"
        time.sleep(1)
    daemon.wait_status(
        "the affinity program loaded again",
        lambda s: s["vms"][VM]["programs"] == {"affinity": "loaded"},
        deadline_s=120,
    )
