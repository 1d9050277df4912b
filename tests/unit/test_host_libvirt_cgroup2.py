"""The parts of libvirt's cgroup v2 isolation that need no kernel: which cgroup a pin makes a
partition, what a pin reports where no partition is made, and the record's safety.

The partitions themselves run against a real cgroup v2 kernel in the test guest
(tests/vm/test_2d_libvirt_cgroup2_in_guest.py)."""

from __future__ import annotations

from pathlib import Path

from pvhost.placement.libvirt_cgroup2 import LibvirtPartitions, leaf_of

SYSTEMD = "/machine.slice/machine-qemu\\x2d3\\x2dweb\\x2d1.scope/libvirt/vcpu2"


def test_the_partition_is_libvirts_own_vcpu_cgroup_whatever_the_layout() -> None:
    assert leaf_of(SYSTEMD, 2) == SYSTEMD
    # libvirt without systemd: machine/qemu-<id>-<name>.libvirt-qemu/vcpuN.
    assert leaf_of("/machine/qemu-1-web.libvirt-qemu/vcpu0", 0) == (
        "/machine/qemu-1-web.libvirt-qemu/vcpu0"
    )


def test_no_partition_outside_a_vcpu_cgroup_of_that_vcpu() -> None:
    assert leaf_of(SYSTEMD, 1) is None, "another vCPU's cgroup"
    assert leaf_of("/machine.slice/x.scope/libvirt/emulator", 0) is None
    assert leaf_of("/vcpu0", 0) is None, "a cgroup right below the root has no chain to use"
    assert leaf_of("/", 0) is None


def test_older_kernels_report_why_they_do_not_isolate(tmp_path: Path) -> None:
    local = LibvirtPartitions(tmp_path, tmp_path / "s.json", "local")
    found = local.isolation(SYSTEMD)
    assert (found.mode, found.why) == ("restricted", "libvirt-no-remote-partitions")
    assert "machine.slice" in found.reason and "Linux < 6.7" in found.reason
    assert not local.isolates()
    none = LibvirtPartitions(tmp_path, tmp_path / "s.json", "restricted")
    assert none.isolation(SYSTEMD).why == "no-partitions"
    remote = LibvirtPartitions(tmp_path, tmp_path / "s.json", "remote")
    assert remote.isolation("").why == "no-vcpu-cgroup"


def test_without_remote_partitions_sync_writes_nothing(tmp_path: Path) -> None:
    """Local mode: a pin is libvirt's alone; sync records and changes nothing (the cgroup
    named does not even exist here: any write would fail)."""
    parts = LibvirtPartitions(tmp_path, tmp_path / "s.json", "local")
    parts.sync({SYSTEMD: 1})
    assert parts.saved() == {"leaves": {}, "ancestors": {}, "siblings": {}}
    assert not (tmp_path / "s.json").exists()


def test_an_unreadable_record_is_kept_aside(tmp_path: Path) -> None:
    state = tmp_path / "libvirt-cgroup2.json"
    state.write_text("{not json")
    parts = LibvirtPartitions(tmp_path, state, "remote")
    assert parts.saved() == {"leaves": {}, "ancestors": {}, "siblings": {}}
    assert (tmp_path / "libvirt-cgroup2.json.unreadable").read_text() == "{not json"
