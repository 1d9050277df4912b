"""The isolation proof run in a guest acting as a host (guest_isolation_probe.py), and what
every kernel's run must show: shared by the 6.12 (remote) and 6.1 (local chain) tests."""

from __future__ import annotations

import json
import sys
from typing import Any

import vmlab

__all__ = ["assert_isolated_under_load", "run_isolation_probe"]


def run_isolation_probe(vm: vmlab.VirtualMachine, timeout_s: int = 240) -> dict[str, Any]:
    r = vm.guest(
        [
            "env",
            "PYTHONDONTWRITEBYTECODE=1",
            "python3",
            "/mnt/extpv/tests/vm/guest_isolation_probe.py",
        ],
        timeout_s=timeout_s,
    )
    assert r.returncode == 0, f"the in-guest isolation probe failed:\n{r.stderr[-3000:]}"
    obs: dict[str, Any] = json.loads(r.stdout)
    return obs


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
    assert detail["isolation"]["mode"] == "isolated", detail
    assert detail["isolated"] is True, detail
    after = obs["after"]
    assert after == {**obs["before"], "base_left": False}, (obs["before"], after)
