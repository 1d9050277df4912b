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

import pytest
import yaml

from tests.demo_output import demo_shares

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


def _summary(status: dict[str, Any], after: dict[int, str], **shown: Any) -> list[str]:
    args = argparse.Namespace(name="extpv-demo", smp=2, producer_cpu=0, consumer_cpu=1, duration=10)
    lines: list[str] = _demo().summarize(
        args,
        accel="tcg",
        boot_s=18.2,
        agent_s=61.0,
        baseline={0: "0-1", 1: "0-1"},
        placement={"vcpu0": "0-1", "vcpu1": "1"},
        after=after,
        result={"mpps": 52.9},
        status=status,
        **shown,
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


ROOT_TASKS = (
    "57 task(s) of the root cpuset may still run on its pCPU (cgroup v1 cannot take CPUs from the "
    "root cpuset; placement.isolate_from keeps /extpv-demo-load off it): move them into a cpuset "
    "named in isolate_from, or use cgroup v2"
)


def test_the_pinned_vcpu_shows_its_cpu_share_under_the_load_and_what_its_pin_achieved() -> None:
    status = {
        "host": {"online": [0, 1], "housekeeping": [0], "eligible": [1]},
        "vms": {
            "extpv-demo": {
                "result": [{"vcpu": 1, "pcpu": 1, "refused": None}],
                "placements": {
                    "1": {"pcpu": 1, "isolation": "restricted", "isolation_reason": ROOT_TASKS}
                },
            }
        },
    }
    load = "8 `yes` processes (4 x 2 CPUs) in cpuset /extpv-demo-load"
    lines = _summary(
        status,
        after={0: "0-1", 1: "0-1"},
        load=load,
        share_before={0: 0.21, 1: 0.23},
        share_pinned={0: 0.2, 1: 0.991},
    )
    assert f"host load: {load}" in lines
    share = (
        "vcpu1 CPU share under the load: 23% before the guest's pin, 99% while pinned to pCPU 1 "
        "(throughput 52.9 Mpps)"
    )
    assert share in lines
    assert f"vcpu1 isolation: restricted: {ROOT_TASKS}" in lines
    assert not any(line.startswith("vcpu0 ") for line in lines)  # not pinned: no share line
    # The throughput line stays, the closing line is still last.
    assert lines.index(share) > lines.index("throughput: 52.9 Mpps over 10 s")
    assert lines[-1].startswith("shown:")

    status["vms"]["extpv-demo"]["placements"]["1"] = {"pcpu": 1, "isolation": "isolated"}
    lines = _summary(status, after={0: "0-1", 1: "0-1"}, load=load)
    assert "vcpu1 isolation: isolated (no other task may run on pCPU 1)" in lines
    assert any(line.startswith("vcpu1 CPU share under the load: ? before") for line in lines)


def _as_the_playbook_prints(lines: list[str], style: str | None = None) -> str:
    """The debug task's result as ansible.cfg's ``callback_result_format = yaml`` shows it:
    long strings wrapped, quoted ones with doubled single quotes (``style='"'``: folded in
    double quotes, as YAML does for a line holding a character it must escape)."""
    return "ok: [localhost] =>\n" + yaml.safe_dump(
        {"msg": lines}, default_flow_style=False, default_style=style, width=60
    )


def test_the_appliance_checks_find_the_share_and_mode_lines_and_fail_without_them() -> None:
    status = {
        "host": {"online": [0, 1], "housekeeping": [0], "eligible": [1]},
        "vms": {
            "extpv-demo": {
                "result": [{"vcpu": 1, "pcpu": 1, "refused": None}],
                "placements": {
                    "1": {"pcpu": 1, "isolation": "restricted", "isolation_reason": ROOT_TASKS}
                },
            }
        },
    }
    full = _summary(
        status,
        after={0: "0-1", 1: "0-1"},
        load="8 `yes` processes (4 x 2 CPUs) in cpuset /extpv-demo-load",
        share_before={1: 0.23},
        share_pinned={1: 0.991},
    )
    for style in (None, '"'):
        (got,) = demo_shares(_as_the_playbook_prints(full, style))
        assert (got.vcpu, got.before, got.pinned, got.pcpu, got.isolation) == (
            "vcpu1",
            23,
            99,
            1,
            "restricted",
        )
    # The demo stops printing any of them, or prints a share it did not measure: the check
    # (and so the appliance test) fails, saying what is missing.
    for drop, why in [
        ("host load:", "no `host load:` line"),
        ("vcpu1 CPU share", "no pinned vCPU's CPU share"),
        ("vcpu1 isolation:", "no isolation mode line for vcpu1"),
        ("throughput:", "no SPSC throughput"),
    ]:
        cut = [line for line in full if not line.startswith(drop)]
        with pytest.raises(AssertionError, match=why):
            demo_shares(_as_the_playbook_prints(cut))
    unmeasured = _summary(status, after={0: "0-1", 1: "0-1"}, load="8 `yes` processes")
    with pytest.raises(AssertionError, match="no pinned vCPU's CPU share"):
        demo_shares(_as_the_playbook_prints(unmeasured))
