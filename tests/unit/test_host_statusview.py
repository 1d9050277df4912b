"""`pvctl status` as text: one compact table per VM (vCPU → pCPU, isolation mode, request age)."""

from __future__ import annotations

from typing import Any

from pvhost.statusview import format_status


def _status(backend: str, placements: dict[str, Any], **detail: Any) -> dict[str, Any]:
    return {
        "backend": backend,
        "isolation": "restricted: why",
        "backend_detail": {"base": "/sys/fs/cgroup/cpuset/extpv", **detail},
        "host": {"online": [0, 1, 2, 3], "housekeeping": [0], "eligible": [1, 2, 3]},
        "vms": {
            "db1": {
                "qmp": "connected",
                "channel": "ready",
                "policy": "identity",
                "remap": False,
                "quota": 4,
                "wanted": [0, 1, 2],
                "last_seq": 7,
                "last_request_age_s": 3.2,
                "result": [
                    {"vcpu": 0, "pcpu": None, "refused": "identity: pCPU 0 is a housekeeping CPU"},
                    {"vcpu": 1, "pcpu": 1, "refused": None},
                    {"vcpu": 2, "pcpu": 2, "refused": None},
                ],
                "vcpus": {str(i): {"tid": 100 + i} for i in range(4)},
                "placements": placements,
                "programs": {"affinity": "loaded"},
            }
        },
        "orphans": {},
    }


def _rows(text: str) -> dict[str, list[str]]:
    """vCPU → its table row's cells."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["vCPU", "tid"])
    rows = {}
    for line in lines[head + 1 :]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[cells[0]] = cells
    return rows


#: A cgroup v1 pin as the backend read it back (pvhost.placement.isolation).
WHY = "cgroup v1 without placement.isolate_from: 3 other task(s) may still run on its pCPU"


def test_cgroup1_table_shows_each_vcpu_its_pcpu_mode_and_the_request_age() -> None:
    v1 = {
        "partition": "n/a (cgroup v1)",
        "cgroup": "/x",
        "isolation": "restricted",
        "isolation_reason": WHY,
    }
    text = format_status(
        _status(
            "cgroup1",
            {"1": {"pcpu": 1, "tid": 101, **v1}, "2": {"pcpu": 2, "tid": 102, **v1}},
            isolation={"mode": "restricted", "withheld": {}},
        )
    )
    assert "host CPUs: online 0-3  housekeeping 0  eligible 1-3" in text
    assert "last request 3 s ago (seq 7)" in text
    assert _rows(text) == {
        "0": ["0", "100", "yes", "-", "refused"],
        "1": ["1", "101", "yes", "1", "restricted"],
        "2": ["2", "102", "yes", "2", "restricted"],
        "3": ["3", "103", "no", "-", "-"],
    }
    assert "vCPU 0 refused: identity: pCPU 0 is a housekeeping CPU" in text
    assert f"vCPU 1, 2 restricted: {WHY}" in text  # one line per distinct reason
    assert "program affinity: loaded" in text
    # The isolation dict is summarised in its own line, not dumped into the backend line.
    assert "{" not in text.splitlines()[0]


def test_the_mode_is_what_the_backend_read_back_and_a_restriction_says_why() -> None:
    """Not inferred from the backend's name or configuration: an isolate_from host whose root
    cpuset still has tasks is restricted, and a v2 partition the kernel invalidated too."""
    v1 = {"partition": "n/a (cgroup v1)", "cgroup": "/x"}
    why = "4 task(s) of the root cpuset may still run on its pCPU"
    placements = {
        "1": {"pcpu": 1, **v1, "isolation": "isolated", "isolation_reason": None},
        "2": {"pcpu": 2, **v1, "isolation": "restricted", "isolation_reason": why},
        "3": {"pcpu": 3, **v1},  # a service that does not say
    }
    text = format_status(_status("cgroup1", placements, isolation={"mode": "isolate_from"}))
    rows = _rows(text)
    assert (rows["1"][-1], rows["2"][-1], rows["3"][-1]) == ("isolated", "restricted", "unknown")
    assert f"  vCPU 2 restricted: {why}" in text.splitlines()
    assert "vCPU 1 restricted" not in text and "vCPU 3 restricted" not in text
    invalid = "the kernel turned the partition 'isolated invalid (reason)': other tasks may run"
    text = format_status(
        _status(
            "cgroup2",
            {
                "1": {"pcpu": 1, "partition": "isolated", "isolation": "isolated"},
                "2": {
                    "pcpu": 2,
                    "partition": "isolated invalid (reason)",
                    "isolation": "restricted",
                    "isolation_reason": invalid,
                },
            },
            remote_partitions=True,
        )
    )
    rows = _rows(text)
    assert (rows["1"][-1], rows["2"][-1]) == ("isolated", "restricted")
    assert f"vCPU 2 restricted: {invalid}" in text


def test_a_vm_with_no_request_yet_says_so() -> None:
    status = _status("cgroup1", {})
    vm = status["vms"]["db1"]
    vm.update(wanted=[], last_seq=None, last_request_age_s=None, result=[])
    text = format_status(status)
    assert "no request yet" in text and "seq" not in text
    assert {cells[2] for cells in _rows(text).values()} == {"no"}


def test_the_readme_example_is_what_pvctl_status_prints() -> None:
    from tests.unit.test_readme import readme_blocks

    example = next(b.text for b in readme_blocks() if b.text.startswith("backend: "))
    reason = (
        "identity: pCPU 0 is a housekeeping CPU, kept for the host (placement.housekeeping); "
        'policy "pool" would place this vCPU elsewhere'
    )
    why = (
        "cgroup v1 without placement.isolate_from: 97 other task(s) may still run on its pCPU "
        "(97 in /); name the cpusets they run in"
    )
    v1 = {
        "partition": "n/a (cgroup v1)",
        "cgroup": "/x",
        "isolation": "restricted",
        "isolation_reason": why,
    }
    status = _status(
        "cgroup1",
        {"1": {"pcpu": 1, **v1}, "2": {"pcpu": 2, **v1}},
        isolation={"mode": "restricted"},
    )
    status["isolation"] = f"restricted: {why}"
    vm = status["vms"]["db1"]
    vm["channel"] = "connected"
    vm["vcpus"] = {str(i): {"tid": 41710 + i} for i in range(4)}
    vm["result"][0]["refused"] = reason
    assert format_status(status) == example
