"""The demo explains itself: its summary on a 2-CPU host says why a vCPU is refused.

The demo's VM run is tested end to end in tests/integration/test_appliance_playbook.py; this is
its summary, from what the run observed, as on the default 2-CPU host (housekeeping CPU 0,
identity policy: the guest pins vCPUs 0 and 1, only pCPU 1 can be given).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOUSEKEEPING = (
    "identity: pCPU 0 is a housekeeping CPU, kept for the host (placement.housekeeping); "
    'policy "pool" would place this vCPU elsewhere'
)


def _demo() -> ModuleType:
    path = REPO / "ansible" / "roles" / "demo" / "files" / "extpv_demo.py"
    spec = importlib.util.spec_from_file_location("extpv_demo", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(status: dict[str, Any], after: dict[int, str]) -> list[str]:
    args = argparse.Namespace(name="extpv-demo", smp=2, producer_cpu=0, consumer_cpu=1, duration=10)
    lines: list[str] = _demo().summarize(
        args,
        accel="tcg",
        boot_s=18.2,
        baseline={0: "0-1", 1: "0-1"},
        placement={"vcpu0": "0-1", "vcpu1": "1"},
        after=after,
        result={"mpps": 52.9},
        status=status,
    )
    return lines


def test_on_a_two_cpu_host_the_refusal_is_announced_and_explained() -> None:
    status = {
        "host": {"online": [0, 1], "housekeeping": [0], "eligible": [1]},
        "vms": {
            "extpv-demo": {
                "result": [
                    {"vcpu": 0, "pcpu": None, "refused": HOUSEKEEPING},
                    {"vcpu": 1, "pcpu": 1, "refused": None},
                ]
            }
        },
    }
    lines = _summary(status, after={0: "0-1", 1: "0-1"})
    text = "\n".join(lines)
    capacity = next(line for line in lines if line.startswith("host CPUs:"))
    assert "housekeeping 0 (kept for the host), eligible 1" in capacity
    assert "at most 1 of the 2 vCPUs" in capacity and "a refusal below is expected" in capacity
    assert f"vCPU 0 was not pinned: {HOUSEKEEPING}" in text
    # The capacity line comes before the refusal it explains; the closing line is last.
    assert lines.index(capacity) < next(i for i, x in enumerate(lines) if "was not pinned" in x)
    assert lines[-1].startswith("shown: the guest's sched_setaffinity reached the host")
    assert "vcpu1, and was undone when the workload exited" in lines[-1]


def test_a_host_with_room_for_both_expects_no_refusal_and_a_pin_left_behind_is_called_out() -> None:
    status = {"host": {"online": [0, 1, 2, 3], "housekeeping": [0], "eligible": [1, 2, 3]}}
    lines = _summary(status, after={0: "0-1", 1: "1"})
    assert "expected" not in "\n".join(lines)
    assert lines[-1].endswith("NOT undone after the workload exited")
    # pvctl status failed (no host section): the summary still closes, without a capacity line.
    lines = _summary({"error": "no container"}, after={0: "0-1", 1: "0-1"})
    assert not any(line.startswith("host CPUs:") for line in lines)
    assert lines[-1].startswith("shown:")
