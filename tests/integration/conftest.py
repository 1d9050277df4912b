"""Fixtures for integration tests (root, real kernel)."""

from __future__ import annotations

import pytest

from tests.conftest import REQUIRE, _missing


@pytest.fixture(scope="session")
def _ebpf_ready() -> None:
    """tracefs and bpffs mounted (the ebpf gate does it; module-scoped fixtures run before
    the per-test gate, so they ask for this first)."""
    reason = _missing("ebpf")
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"[ebpf] capability required in CI but absent: {reason}")
        pytest.skip(f"[ebpf] {reason}")
