"""Running an in-guest probe (``tests/vm/guest_*_probe.py``) from the host: the shared test
guest runs it from this checkout over the 9p share, and it prints one JSON object of what it
observed (every step's outcome, an error too)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

import vmlab

__all__ = ["probe_fixture", "run_probe"]


def run_probe(vm: vmlab.VirtualMachine, script: str, timeout_s: int = 240) -> dict[str, Any]:
    """Run ``tests/vm/<script>`` in ``vm`` (the checkout at /mnt/extpv); its JSON output."""
    r = vm.guest(
        ["env", "PYTHONDONTWRITEBYTECODE=1", "python3", f"/mnt/extpv/tests/vm/{script}"],
        timeout_s=timeout_s,
    )
    assert r.returncode == 0, f"the in-guest probe {script} failed:\n{r.stderr[-3000:]}"
    observed: dict[str, Any] = json.loads(r.stdout)
    return observed


def probe_fixture(script: str, timeout_s: int = 240) -> Callable[..., dict[str, Any]]:
    """A module's ``observed`` fixture: what ``tests/vm/<script>`` observed in the shared test
    guest, run once for the module (``observed = probe_fixture("guest_…_probe.py")``)."""

    @pytest.fixture(scope="module")
    def observed(guest_vm: vmlab.VirtualMachine) -> dict[str, Any]:
        return run_probe(guest_vm, script, timeout_s=timeout_s)

    return observed
