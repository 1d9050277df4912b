"""The local-partition chain's plan: which CPUs each VM's partition holds (pure)."""

from __future__ import annotations

import pytest

from pvhost.errors import PlacementError
from pvhost.placement.chain import partition_reason, plan

POOL = frozenset({1, 2, 3, 4})


def test_a_vm_with_pins_gets_its_pcpus_and_the_lowest_free_cpu_as_its_extra() -> None:
    assert plan({"a": {0: 3}}, POOL, {}) == {"a": frozenset({1, 3})}


def test_nothing_pinned_is_an_empty_chain() -> None:
    assert plan({}, POOL, {}) == {}
    assert plan({"a": {}}, POOL, {}) == {}


def test_a_vm_keeps_its_extra_while_it_stays_free() -> None:
    # Its other threads run there: a second pin must not move them.
    assert plan({"a": {0: 3, 1: 1}}, POOL, {"a": frozenset({3, 4})}) == {"a": frozenset({1, 3, 4})}


def test_an_extra_that_another_vm_pins_moves_and_pins_come_first() -> None:
    got = plan({"a": {0: 3}, "b": {0: 4}}, POOL, {"a": frozenset({3, 4})})
    assert got == {"a": frozenset({1, 3}), "b": frozenset({2, 4})}


def test_no_cpu_left_for_an_extra_is_refused_with_the_reason() -> None:
    with pytest.raises(PlacementError, match="no CPU left for the local-partition chain"):
        plan({"a": {0: 1, 1: 2, 2: 3, 3: 4}}, POOL, {})


def test_partition_reason_reads_the_kernels_words() -> None:
    assert partition_reason("root") is None
    assert partition_reason("root invalid (Parent unable to distribute cpu downstream)") == (
        "Parent unable to distribute cpu downstream"
    )


def test_a_vm_that_drops_its_last_pin_while_others_hold_theirs_keeps_its_extra_alone() -> None:
    # The slice stays a partition for "a": "b" (threads, no pin) would have no CPU as a member.
    got = plan({"a": {0: 3}, "b": {}}, POOL, {"b": frozenset({2, 4})}, frozenset({"a", "b"}))
    assert got == {"a": frozenset({1, 3}), "b": frozenset({2})}


def test_with_no_pin_anywhere_nobody_is_parked() -> None:
    assert plan({"b": {}}, POOL, {"b": frozenset({2})}, frozenset({"a", "b"})) == {}
