"""The guest image and the launcher: what every end-to-end test stands on.

Runs on the shared VM: the guest kernel sees the agent's virtio-serial port under its contract
name, the agent and its trusted key are installed, and the paper's workload pins its threads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlab
from vmlab.images import GuestImage

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_manifest_records_what_was_built(guest_image: GuestImage) -> None:
    manifest = json.loads((guest_image.path / "manifest.json").read_text())
    assert manifest["suite"] == "trixie"
    assert manifest["build_seconds"] > 0
    for name in ("rootfs.img", "vmlinuz", "initrd.img"):
        assert manifest["files"][name]["bytes"] == (guest_image.path / name).stat().st_size
    for pkg in ("linux-image-amd64", "systemd", "udev", "python3-pydantic", "libbpf1"):
        assert any(p.startswith(pkg) for p in manifest["installed_packages"]), pkg


def test_vm_runtime_directory_is_where_pvhost_looks(guest_vm: vmlab.VirtualMachine) -> None:
    for name in ("qmp.sock", "launcher-qmp.sock", "agent.sock", "console.log", "qemu.pid"):
        assert (guest_vm.dir / name).exists(), name
    assert int((guest_vm.dir / "qemu.pid").read_text()) == guest_vm.pid
    # debug-threads=on: the vCPU threads carry their index in their name, for pvhost and humans.
    names = {
        p.joinpath("comm").read_text().strip() for p in Path(f"/proc/{guest_vm.pid}/task").iterdir()
    }
    assert {f"CPU {i}/{guest_vm.accel.upper()}" for i in range(4)} <= names
    listed = vmlab.list_vms(guest_vm.spec.runtime_dir)
    assert [v["name"] for v in listed if v["alive"]] == ["e2e"]


def test_console_log_has_the_whole_boot(guest_vm: vmlab.VirtualMachine) -> None:
    text = guest_vm.console_text()
    assert "Linux version" in text, "the first kernel lines must be logged even with no reader"
    assert vmlab.CRASH_PATTERN.search(text) is None


def test_agent_port_trusted_key_and_agent_are_installed(guest_vm: vmlab.VirtualMachine) -> None:
    r = guest_vm.guest("readlink /dev/virtio-ports/org.extpv.agent.0; ls /etc/pvagent/trusted.d")
    r.check()
    port, key = r.stdout.split()
    assert port.startswith("../vport")
    assert key.endswith(".pem")
    guest_vm.guest(["python3", "-c", "import pvagent, pvproto"]).check()
    # The guest side only: the image carries no host code (packaging/build-wheel agent).
    host = guest_vm.guest(["python3", "-c", "import pvhost"])
    assert host.returncode != 0 and "No module named 'pvhost'" in host.stderr, host.stderr
    assert guest_vm.guest(["sh", "-c", "command -v pvctl pvhost"]).stdout.strip() == ""


def test_spscq_pins_its_threads_and_reports_mpps(guest_vm: vmlab.VirtualMachine) -> None:
    r = guest_vm.guest(["spscq", "--duration", "1", "--json", "--producer-cpu", "2",
                        "--consumer-cpu", "3"]).check()  # fmt: skip
    result = json.loads(r.stdout)
    assert result["mpps"] > 0
    assert (result["producer_ran_on"], result["consumer_ran_on"]) == (2, 3)
    bad = guest_vm.guest(["spscq", "--producer-cpu", "9", "--duration", "1"])
    assert bad.returncode != 0
    assert "pthread_setaffinity_np(cpu 9)" in bad.stderr


def test_boot_loads_no_driver_for_unused_q35_parts(guest_vm: vmlab.VirtualMachine) -> None:
    """Boot time under TCG is the lab's budget: udev loads none of the q35 drivers the image
    blacklists (docs/guest-images.md; bench/results/image.md: 15 s off a boot, 20 s off the
    agent's start)."""
    blacklisted = set(
        guest_vm.guest("sed -n 's/^blacklist //p' /etc/modprobe.d/extpv-vm.conf")
        .check()
        .stdout.split()
    )
    assert {"kvm", "iTCO_wdt", "ahci"} <= blacklisted
    modules = set(guest_vm.guest("cut -d' ' -f1 /proc/modules").check().stdout.split())
    assert "9pnet_virtio" in modules  # what the lab loaded: /proc/modules was read
    assert not modules & blacklisted, modules & blacklisted


def test_boot_redoes_no_build_time_work(guest_vm: vmlab.VirtualMachine) -> None:
    """Every VM boots the pristine image, so anything the boot does once per image it does at
    every boot: the initramfs runs no udev (its init loads virtio-blk and ext4 itself), and
    systemd's ConditionNeedsUpdate units find /etc up to date (docs/guest-images.md)."""
    text = guest_vm.console_text()
    initramfs = text[text.index("Run /init as init process") : text.index("systemd[1]:")]
    assert "Loading essential drivers" in initramfs, initramfs
    assert "udev" not in initramfs, initramfs
    for unit in ("ldconfig.service", "systemd-journal-catalog-update.service"):
        r = guest_vm.guest(["systemctl", "show", unit, "-p", "ConditionResult",
                            "-p", "ConditionTimestampMonotonic"]).check()  # fmt: skip
        shown = dict(line.split("=", 1) for line in r.stdout.split())
        # Checked at this boot (sysinit.target wants it) and found nothing to do.
        assert shown["ConditionTimestampMonotonic"] != "0", (unit, shown)
        assert shown["ConditionResult"] == "no", (unit, shown)
