"""The placement state file: typed records that survive a restart, a version, and an unusable
file that is reported and kept aside instead of silently dropped (its undo data is evidence)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pvhost.state import (
    AttachRecord,
    Cgroup1Home,
    Cgroup1Pin,
    Cgroup2Pin,
    StateFile,
    StateStore,
)


def v1_store(path: Path) -> StateStore[Cgroup1Pin]:
    return StateStore(path, StateFile[Cgroup1Pin])


def v2_store(path: Path) -> StateStore[Cgroup2Pin]:
    return StateStore(path, StateFile[Cgroup2Pin])


PIN1 = Cgroup1Pin(tid=4242, pcpu=3, prev_cpuset="/", prev_affinity=(0, 1, 3), prev_effective=(0,))
PIN2 = Cgroup2Pin(tid=77, pcpu=1, prev_cpus="", prev_affinity=(0, 1), prev_effective=(0, 1))


def test_records_survive_a_restart_with_their_types(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cgroup2.json"
    store = v2_store(path)
    store.set_attach("vm", AttachRecord(pid=70, prev_cgroup="/machine.slice"))
    store.set_pin("vm", 1, PIN2)
    on_disk = json.loads(path.read_text())
    assert on_disk["version"] == 1
    assert on_disk["vms"]["vm"]["vcpus"]["1"]["prev_cpus"] == ""

    again = v2_store(path)
    assert again.kept_aside is None
    assert again.pin("vm", 1) == PIN2
    assert again.attach("vm") == AttachRecord(pid=70, prev_cgroup="/machine.slice")
    assert again.pins() == {"vm": {1: 1}}


def test_a_vm_with_nothing_left_is_dropped(tmp_path: Path) -> None:
    store = v1_store(tmp_path / "cgroup1.json")
    store.set_pin("vm", 0, PIN1)
    store.set_pin("vm", 0, None)
    assert store.vms() == []
    assert json.loads((tmp_path / "cgroup1.json").read_text())["vms"] == {}


def test_a_resident_thread_keeps_its_vm_until_it_goes_home(tmp_path: Path) -> None:
    """cgroup v1 resident mode: the home of a moved vCPU thread survives a restart, keeps
    the VM's record with no pin, and the VM is dropped once the last thread went home."""
    path = tmp_path / "cgroup1.json"
    home = Cgroup1Home(tid=4242, prev_cpuset="/machine", prev_affinity=(1,), prev_effective=(0, 1))
    store = v1_store(path)
    store.set_home("vm", 0, home)
    store.set_pin("vm", 0, PIN1)
    store.set_pin("vm", 0, None)
    again = v1_store(path)
    assert again.vms() == ["vm"] and again.pins() == {}
    assert again.homes("vm") == {0: home}
    again.set_home("vm", 0, None)
    assert v1_store(path).vms() == []


def test_a_file_from_before_versioning_is_read_as_version_1(tmp_path: Path) -> None:
    """pvhost before the version field wrote the same layout; its undo data must stay usable."""
    path = tmp_path / "cgroup1.json"
    record = {"tid": 9, "pcpu": 1, "prev_cpuset": "/", "prev_affinity": [0, 1]}
    path.write_text(json.dumps({"vms": {"vm": {"attach": None, "vcpus": {"2": record}}}}))
    store = v1_store(path)
    assert store.kept_aside is None
    pin = store.pin("vm", 2)
    assert pin is not None and pin.prev_effective == (0, 1), "oldest records had no effective"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"vms": {"vm": {"vcpus": {"0": {"tid": 12', "not JSON"),
        (b'{"version": 2, "vms": {}}', "version 2"),
        (b'{"version": 1, "vms": {"vm": {"vcpus": {"0": {"tid": -1}}}}}', "invalid"),
        (b"[]", "version None"),
    ],
)
def test_an_unusable_file_is_kept_aside_and_logged(
    tmp_path: Path, content: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cgroup1.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="pvhost.state"):
        store = v1_store(path)
    assert store.vms() == [] and store.pins() == {}
    assert store.kept_aside is not None and store.kept_aside.read_bytes() == content
    assert store.kept_aside.name.startswith("cgroup1.json.unreadable-")
    assert not path.exists(), "the next save starts a new file instead of overwriting it"
    [record] = caplog.records
    assert str(path) in record.getMessage() and str(store.kept_aside) in record.getMessage()
    assert reason in record.getMessage()


def test_a_second_unusable_file_never_replaces_the_first_copy(tmp_path: Path) -> None:
    path = tmp_path / "cgroup1.json"
    path.write_bytes(b"first")
    first = v1_store(path).kept_aside
    path.write_bytes(b"second")
    second = v1_store(path).kept_aside
    assert first is not None and second is not None and first != second
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")


def test_another_backends_record_is_refused(tmp_path: Path) -> None:
    store = v1_store(tmp_path / "cgroup1.json")
    with pytest.raises(TypeError, match="Cgroup2Pin in a Cgroup1Pin store"):
        store.set_pin("vm", 0, PIN2)
    assert not (tmp_path / "cgroup1.json").exists()


def test_a_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = v1_store(tmp_path / "cgroup1.json")
    for vcpu in range(5):
        store.set_pin("vm", vcpu, PIN1)
    assert [p.name for p in tmp_path.iterdir()] == ["cgroup1.json"]
