"""The isolation field: decided per backend from what was read back, and carried to the guest
without breaking agents that predate it (protocol 4; agents of 2 and 3 reject unknown fields).

The wire check runs the old agents' own pvproto (taken from git: the agent of fef00c3, protocol
2, and of 8674d6d, protocol 3, what the .deb of that time carries) on frames this pvproto wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pvhost.placement.isolation import (
    ISOLATED,
    TaskScan,
    cgroup1_isolation,
    cgroup2_isolation,
    libvirt_isolation,
)
from pvproto import (
    HEADER_SIZE,
    SUPPORTED_VERSIONS,
    AffinityResult,
    FrameDecoder,
    VcpuPlacement,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]


# -- the decision ------------------------------------------------------------------------------
def test_cgroup2_is_isolated_only_by_a_valid_isolated_partition() -> None:
    assert cgroup2_isolation("isolated") == ISOLATED
    no = cgroup2_isolation(None)
    assert (no.mode, no.why) == ("restricted", "no-partitions")
    assert "Linux >= 6.7" in no.reason
    bad = cgroup2_isolation("isolated invalid (Cpu list in cpuset.cpus not exclusive)")
    assert (bad.mode, bad.why) == ("restricted", "partition-invalid")
    assert "not exclusive" in bad.reason
    member = cgroup2_isolation("member")
    assert (member.mode, member.why) == ("restricted", "not-isolated-partition")


def test_cgroup1_is_isolated_only_when_no_other_task_may_run_on_the_pcpu() -> None:
    # isolate_from took the pCPU from every named cpuset and nothing else may run there.
    assert cgroup1_isolation(["/machine.slice"], {"/": 0, "/machine.slice": 0}) == ISOLATED
    # Configuration is not the answer: the same isolate_from with tasks left in the root.
    root = cgroup1_isolation(["/machine.slice"], {"/": 57, "/machine.slice": 0})
    assert (root.mode, root.why) == ("restricted", "root-cpuset-tasks")
    assert root.reason.startswith("57 task(s) of the root cpuset may still run on its pCPU")
    assert "/machine.slice" in root.reason and "cgroup v2" in root.reason
    other = cgroup1_isolation(["/machine.slice"], {"/": 0, "/system.slice": 3})
    assert (other.mode, other.why) == ("restricted", "other-cpusets")
    assert "3 in /system.slice" in other.reason and "add those cpusets" in other.reason
    none = cgroup1_isolation([], {"/": 12})
    assert (none.mode, none.why) == ("restricted", "no-isolate-from")
    assert "without placement.isolate_from" in none.reason
    # v1 with nothing else on the host and no isolate_from needed: isolated all the same.
    assert cgroup1_isolation([], {}) == ISOLATED


def test_a_task_counts_only_where_its_affinity_lets_it_run() -> None:
    scan = TaskScan({"/": (frozenset({0}), frozenset({0, 1})), "/load": (frozenset({1}),)})
    assert scan.sharing(1) == {"/": 1, "/load": 1}
    assert scan.sharing(0) == {"/": 2, "/load": 0}
    assert cgroup1_isolation(["/load"], scan.sharing(2)) == ISOLATED


def test_libvirt_pins_only_confine() -> None:
    assert libvirt_isolation().mode == "restricted" and "libvirt" in libvirt_isolation().reason


# -- the protocol ------------------------------------------------------------------------------
PINNED = VcpuPlacement(vcpu=0, pcpu=1, isolation="restricted", isolation_reason="v1 root tasks")
RESULT = AffinityResult(
    seq=7,
    placements=[PINNED, VcpuPlacement(vcpu=1, refused="pool exhausted")],
    policy="pool",
    backend="cgroup1",
)


def test_only_a_pin_has_an_isolation_and_only_a_restriction_a_reason() -> None:
    with pytest.raises(ValidationError, match="only a placement with a pcpu"):
        VcpuPlacement(vcpu=0, refused="no", isolation="restricted")
    with pytest.raises(ValidationError, match="says why a placement is restricted"):
        VcpuPlacement(vcpu=0, pcpu=1, isolation="isolated", isolation_reason="x")
    with pytest.raises(ValidationError):
        VcpuPlacement(vcpu=0, pcpu=1, isolation="isolated-from")  # type: ignore[arg-type]


def test_the_field_travels_in_protocol_4_and_is_left_out_below() -> None:
    assert 4 in SUPPORTED_VERSIONS
    (got,) = FrameDecoder().feed(encode(RESULT, version=4))
    assert got == RESULT
    for version in (2, 3):
        body = json.loads(encode(RESULT, version=version)[HEADER_SIZE:])
        assert [sorted(p) for p in body["placements"]] == [["pcpu", "refused", "vcpu"]] * 2
        (old,) = FrameDecoder().feed(encode(RESULT, version=version))
        assert isinstance(old, AffinityResult)
        assert old.placements[0].pcpu == 1 and old.placements[0].isolation is None


DECODE = """
import sys
from pvproto import FrameDecoder, AffinityResult
for frame in sys.stdin.buffer.read().split(b"--8<--"):
    (msg,) = FrameDecoder().feed(frame)
    print(type(msg).__name__, [(p.vcpu, p.pcpu) for p in msg.placements]
          if isinstance(msg, AffinityResult) else msg)
"""


@pytest.mark.parametrize(("commit", "versions"), [("fef00c3", (2,)), ("8674d6d", (2, 3))])
def test_agents_of_protocol_2_and_3_read_the_new_hosts_results(
    tmp_path: Path, commit: str, versions: tuple[int, ...]
) -> None:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "pvproto"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.fail(f"cannot take pvproto of {commit} from git: {archive.stderr.decode()[:300]}")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    # What this host sends at each version, and what it would send if it did not leave the
    # field out below protocol 4.
    sent = [encode(RESULT, version=v) for v in versions]
    unstripped = [
        encode(_Unstripped.model_validate(RESULT.model_dump()), version=v) for v in versions
    ]
    old = subprocess.run(
        [sys.executable, "-c", DECODE],
        input=b"--8<--".join(sent + unstripped),
        capture_output=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert old.returncode == 0, old.stderr.decode()
    lines = old.stdout.decode().splitlines()
    assert lines[: len(versions)] == ["AffinityResult [(0, 1), (1, None)]"] * len(versions)
    assert all(line.startswith("InvalidBody") for line in lines[len(versions) :]), lines


class _Unstripped(AffinityResult):
    """The field in every version: what an old agent must never be sent."""

    def wire_body(self, version: int) -> dict[str, object]:
        return self.model_dump(mode="json")
