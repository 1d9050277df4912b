"""The local-partition chain's plan: which CPUs each VM's partition holds (pure)."""

from __future__ import annotations

import pytest

from pvhost.errors import PlacementError
from pvhost.placement.chain import growth_spare, partition_reason, plan

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


# -- the spare CPU of the growth step (a 5-CPU host, CPU 0 housekeeping, pool 1-4) -----------


def test_the_first_pin_borrows_the_highest_pool_cpu_the_host_keeps_besides_another() -> None:
    target = {"a": frozenset({1, 2})}
    assert growth_spare(target, {}, frozenset(), frozenset({0, 3, 4}), POOL) == {4}


def test_growing_to_all_of_the_slice_without_a_spare_is_refused_up_front_with_the_reason() -> None:
    # Pins on 1 and 3, extra 2: a third pin onto 4 leaves the host CPU 0 alone, so the slice
    # cannot borrow a CPU and the kernel would refuse the VM partition's growth.
    now = frozenset({1, 2, 3})
    with pytest.raises(PlacementError) as refused:
        growth_spare({"a": now | {4}}, {"a": now}, now, frozenset({0}), POOL)
    why = str(refused.value)
    assert "VM a: no spare CPU for the local-partition chain's growth step" in why
    assert "grows to 1-4, and the host would keep only 0" in why
    assert "Parent unable to distribute cpu downstream" in why


def test_a_first_pin_on_a_host_with_no_cpu_to_lend_is_refused() -> None:
    # Pool 1-2 on a 3-CPU host: pCPU 1 and the extra CPU 2 leave only housekeeping CPU 0.
    with pytest.raises(PlacementError, match="no spare CPU"):
        growth_spare({"a": frozenset({1, 2})}, {}, frozenset(), frozenset({0}), frozenset({1, 2}))


def test_no_spare_is_needed_or_taken_to_shrink_or_to_keep_a_partition() -> None:
    # Without a CPU to lend: nothing refused. With one: not taken from the host (no writes).
    now = frozenset({1, 2, 3})
    for free in (frozenset({0}), frozenset({0, 4})):
        assert growth_spare({"a": frozenset({1, 2})}, {"a": now}, now, free, POOL) == set()
        assert growth_spare({"a": now}, {"a": now}, now, free, POOL) == set()


def test_no_spare_is_needed_while_another_vm_keeps_cpus_in_the_slice() -> None:
    # "b"'s partition does not take all of the slice: "a"'s CPUs stay beside it.
    target = {"a": frozenset({1, 2}), "b": frozenset({3, 4})}
    got = growth_spare(target, {"a": frozenset({1, 2})}, frozenset({1, 2}), frozenset({0}), POOL)
    assert got == set()


def test_a_spare_needs_a_pool_cpu_among_those_the_host_keeps() -> None:
    # The host keeps two CPUs, neither in the pool: nothing to lend, and the growth is refused.
    with pytest.raises(PlacementError, match="no spare CPU"):
        growth_spare({"a": frozenset({1, 2})}, {}, frozenset(), frozenset({0, 5}), POOL)
