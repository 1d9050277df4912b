"""The isolation proof run in a guest acting as a host (guest_isolation_probe.py), and what
every kernel's run must show: shared by the 6.12 (remote) and 6.1 (local chain) tests."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import vmlab
from tests.vm.probes import run_probe

__all__ = [
    "assert_crashes_restart_to_the_last_request",
    "assert_daemon_isolates",
    "assert_isolated_under_load",
    "run_daemon_probe",
    "run_isolation_probe",
]

REPO = Path(__file__).resolve().parents[2]
#: The daemon's pure-Python host dependencies that the guest image lacks, copied from this
#: host's environment into an ignored path of the checkout (the guest sees it over 9p).
GUEST_PYLIB = REPO / "images" / "out" / "guest-pylib"


def _guest_pylib() -> None:
    for package in ("qemu", "prometheus_client"):
        target = GUEST_PYLIB / package
        if target.exists():
            continue
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} not installed"
        source = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))


def run_isolation_probe(vm: vmlab.VirtualMachine, timeout_s: int = 360) -> dict[str, Any]:
    return run_probe(vm, "guest_isolation_probe.py", timeout_s=timeout_s)


def assert_isolated_under_load(obs: dict[str, Any], pcpu: int = 1) -> None:
    """While the pin holds, no ``yes`` ran on the pinned pCPU (nor on any other CPU taken
    from the host) and the spinning vCPU stand-in got ≥ 90 % of it; before the pin and after
    the unpin it shares its CPU with the load."""
    for name in ("setup", "attach", "pin", "describe", "unpin"):
        assert obs["errors"].get(name) is None, obs["errors"][name]
    iso = obs["isolation"]
    print(
        f"\n[isolation/{obs['mode']}] {obs['load']} yes; vCPU share contended "
        f"{iso['contended']:.0%}, pinned {iso['pinned']:.0%}, released {iso['released']:.0%}; "
        f"pin {iso['pin_ms']:.1f} ms, unpin {iso['unpin_ms']:.1f} ms; taken from the host "
        f"{iso['taken']}",
        file=sys.stderr,
    )
    assert iso["load_before"] > 0, "the load must run on the pCPU before the pin"
    assert pcpu in iso["taken"], iso["pinned_view"]
    assert iso["load_on_pcpu"] == 0, f"a yes process ran on the pinned pCPU: {iso}"
    assert iso["load_on_taken"] == 0, f"a yes process ran on a CPU taken from the host: {iso}"
    assert iso["pinned"] >= 0.9, f"the pinned thread got {iso['pinned']:.0%} of its pCPU"
    assert iso["load_after"] > 0, "the load must have the pCPU again after the unpin"
    assert iso["contended"] < 0.6 and iso["released"] < 0.6, iso
    detail = iso["describe"]["vms"]["spin"]["0"]
    assert detail["isolation"] == "isolated", detail
    assert detail["isolated"] is True, detail
    after = obs["after"]
    assert after == {**obs["before"], "base_left": False}, (obs["before"], after)


def assert_crashes_restart_to_the_last_request(obs: dict[str, Any]) -> None:
    """kill -9 before every cgroupfs write of the first pin (the one that builds the chain, or
    the VM's exclusive CPUs, from nothing), a second pin, an unpin of one of two and the last
    unpin (the one that dissolves it): after each restart every cpuset, partition and thread
    affinity is exactly what the last valid request implies."""
    assert obs["errors"].get("crashes") is None, obs["errors"]["crashes"]
    crashes = obs["crashes"]
    cases = {c["case"] for c in crashes}
    assert cases == {"first pin", "second pin", "unpin of one of two", "last unpin"}, cases
    for case in cases:
        points = [c for c in crashes if c["case"] == case]
        # Every write of the operation was a kill point, and each one was reached.
        assert [c["index"] for c in points] == list(range(points[0]["writes"])), points
    for crash in crashes:
        where = f"write {crash['index']} ({crash['write']}) of the {crash['case']}"
        assert crash["exit"] == 137, f"the kill before {where} was never reached: {crash}"
        assert crash["ok"], (
            f"after kill -9 before {where}:\nfound    {crash['found']}\n"
            f"expected {crash['expected']}"
        )
    print(
        f"\n[crashes/{obs['mode']}] kill -9 points checked: "
        + ", ".join(f"{case} {sum(c['case'] == case for c in crashes)}" for case in sorted(cases)),
        file=sys.stderr,
    )


def run_daemon_probe(vm: vmlab.VirtualMachine, timeout_s: int = 450) -> dict[str, Any]:
    """guest_daemon_isolation.py in ``vm``: ``pvhost run`` with a spinning nested QEMU."""
    _guest_pylib()
    r = vm.guest(
        ["env", "PYTHONDONTWRITEBYTECODE=1", "python3",
         "/mnt/extpv/tests/vm/guest_daemon_isolation.py"],
        timeout_s=timeout_s,
    )  # fmt: skip
    assert r.returncode == 0, f"the in-guest daemon run failed:\n{r.stderr[-3000:]}"
    obs: dict[str, Any] = json.loads(r.stdout)
    return obs


def assert_daemon_isolates(obs: dict[str, Any], mode: str) -> None:
    """Through ``pvhost run``: the guest's pin of vCPU 0 isolates its pCPU from the load, the
    status says so, and the release gives it back."""
    print(
        f"\n[isolation/daemon/{mode}] {obs['load']} yes; vCPU 0 share contended "
        f"{obs['contended']:.0%}, pinned {obs['pinned']:.1%} (pCPU idle {obs['pcpu_idle']:.1%}, "
        f"its kernel threads {obs['pcpu_kernel']:.1%}, interrupts {obs['pcpu_irq']:.1%}; "
        f"other threads allowed there: {obs['pcpu_other_allowed']}, they ran "
        f"{obs['pcpu_other']:.1%}: {obs['pcpu_other_who']}), "
        f"released {obs['released']:.0%}; "
        f"pin {obs['pin_ms']:.0f} ms, unpin {obs['unpin_ms']:.0f} ms (guest call to result); "
        f"stages (s): {obs.get('stages')}",
        file=sys.stderr,
    )
    assert [p["vcpu"] for p in obs["placements"]] == [0], obs["placements"]
    pcpu = obs["pcpu"]
    assert pcpu != 0, "CPU 0 is housekeeping"
    assert obs["load_on_pcpu"] == 0, f"a yes process ran on the pinned pCPU {pcpu}"
    # Isolation: no thread of user space but the vCPU's may run on its pCPU at all (the
    # kernel's own threads and interrupts stay there by design), and the vCPU gets most of it.
    # The remainder (idle, kernel threads, interrupts) is printed, not bounded: in this TCG
    # guest the scheduler's clock and the CPU's accounting do not add up to the window when the
    # host is starved (ci-23: 5.7 % accounted to none, ci-42: 5.8 %; a run with no other
    # thread allowed on the pCPU: 96.5 % + 0.6 % idle + 0.3 % interrupts; the CPU's tick-
    # sampled task time covered 67 % of the window), so a bound on the sum measured TCG,
    # not isolation.
    assert obs["pcpu_other_allowed"] == "none", (
        f"threads other than vCPU 0's may run on its isolated pCPU {pcpu}: "
        f"{obs['pcpu_other_allowed']}"
    )
    got, idle, kernel, irq = obs["pinned"], obs["pcpu_idle"], obs["pcpu_kernel"], obs["pcpu_irq"]
    assert got >= 0.85, (
        f"vCPU 0 got {got:.1%} of pCPU {pcpu}, idle {idle:.1%}, its kernel threads "
        f"{kernel:.1%}, interrupts {irq:.1%}"
    )
    assert obs["load_after"] > 0, "the load must have the pCPU again after the release"
    assert obs["contended"] < 0.6 and obs["released"] < 0.6, obs
    placed = obs["status_placements"]["0"]
    assert placed["isolation"] == "isolated" and placed["isolated"], placed
    assert str(obs["status_isolation"]).startswith("isolated:"), obs["status_isolation"]
    row = rf"^\s+0\s+\d+\s+yes\s+{pcpu}\s+isolated$"  # pvctl status: vCPU 0's row
    assert re.search(row, obs["status_text"], re.MULTILINE), obs["status_text"]
    assert obs["daemon_rc"] == 0, obs["daemon_log"]
    assert obs["slice_left"] is False, "pvhost must leave no cgroup behind"
