"""Policies are pure: checked over random hosts, pools, quotas and competing VMs."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pvhost.policy import HostPool, Plan, VmView, apply_plan, eligible_cpus, plan
from pvhost.refusal import RefusalCode
from pvhost.topology import HostTopology

POLICIES = ("identity", "pool", "ht-aware")


@st.composite
def hosts(draw: st.DrawFn) -> HostPool:
    smt = draw(st.sampled_from([1, 2]))
    ncpus = draw(st.integers(1, 12)) * smt
    topology = HostTopology.flat(set(range(ncpus)), smt=smt)
    cpus = sorted(topology.online)
    housekeeping = frozenset(draw(st.lists(st.sampled_from(cpus), max_size=3)))
    pool = draw(st.none() | st.frozensets(st.integers(0, ncpus + 2), max_size=ncpus + 2))
    return HostPool(topology, housekeeping, pool)


@st.composite
def vms(draw: st.DrawFn, name: str) -> VmView:
    n = draw(st.integers(1, 10))
    smt = draw(st.sampled_from([1, 2]))
    siblings = tuple(frozenset(range(i, min(i + smt, n))) for i in range(0, n, smt))
    return VmView(
        name=name,
        vcpus=frozenset(range(n)),
        quota=draw(st.integers(0, 6)),
        policy=draw(st.sampled_from(POLICIES)),
        guest_siblings=tuple(g for g in siblings if len(g) > 1),
    )


wanted_sets = st.frozensets(st.integers(0, 12), max_size=12)


def check_plan(result: Plan, wanted: frozenset[int], vm: VmView, host: HostPool, *,
               others: dict[int, tuple[str, int]]) -> None:  # fmt: skip
    # Every wanted vCPU is answered exactly once: a pCPU or a reason.
    assert set(result.mapping) | set(result.refused) == set(wanted)
    assert not set(result.mapping) & set(result.refused)
    assert all(reason for reason in result.refused.values())
    # No pCPU twice, none of another VM's, none outside the eligible set, quota kept.
    pcpus = list(result.mapping.values())
    assert len(pcpus) == len(set(pcpus))
    assert not set(pcpus) & {p for p, owner in others.items() if owner[0] != vm.name}
    assert set(pcpus) <= eligible_cpus(host)
    assert not set(pcpus) & host.housekeeping
    assert len(pcpus) <= vm.quota
    if vm.policy == "identity":
        assert all(v == p for v, p in result.mapping.items())


@settings(max_examples=300, deadline=None)
@given(host=hosts(), a=vms("a"), b=vms("b"), wa=wanted_sets, wb=wanted_sets, wb2=wanted_sets)
def test_plans_respect_invariants_and_undo_restores(
    *, host: HostPool, a: VmView, b: VmView, wa: frozenset[int], wb: frozenset[int],
    wb2: frozenset[int],
) -> None:  # fmt: skip
    first = plan(wa, a, host, {})
    check_plan(first, wa, a, host, others={})
    alloc_a = apply_plan({}, first)
    pb = plan(wb, b, host, alloc_a)
    check_plan(pb, wb, b, host, others=alloc_a)
    both = apply_plan(alloc_a, pb)
    assert Counter(owner for owner in both.values()).most_common(1)[0][1] == 1 if both else True
    # A changed request of b still keeps every invariant against a.
    pb2 = plan(wb2, b, host, both)
    check_plan(pb2, wb2, b, host, others=both)
    after = apply_plan(both, pb2)
    # The same request again changes nothing (no churn).
    again = plan(wb2, b, host, after)
    assert dict(again.mapping) == dict(pb2.mapping)
    # The empty request releases everything b held: exactly a's allocations remain.
    released = apply_plan(after, plan([], b, host, after))
    assert released == alloc_a


def test_identity_is_the_papers_mapping_and_explains_refusals() -> None:
    host = HostPool(HostTopology.flat({0, 1, 2, 3}), housekeeping=frozenset({0}))
    vm = VmView("a", frozenset(range(6)), quota=8, policy="identity")
    other = {2: ("b", 0)}
    result = plan([0, 1, 2, 5, 9], vm, host, other)
    assert result.mapping == {1: 1}
    assert "housekeeping" in result.refused[0].message
    assert result.refused[0].code == RefusalCode.IDENTITY_UNAVAILABLE
    assert "held by VM b vCPU 0" in result.refused[2].message
    assert "not an online host CPU" in result.refused[5].message
    assert "unknown vCPU 9" in result.refused[9].message


def test_pool_takes_whole_free_cores_first() -> None:
    host = HostPool(HostTopology.flat(set(range(8)), smt=2))  # cores {0,1} {2,3} {4,5} {6,7}
    vm = VmView("a", frozenset(range(4)), quota=4, policy="pool")
    taken = {0: ("b", 0)}  # core {0,1} is half used by another VM
    result = plan([0, 1], vm, host, taken)
    assert result.mapping == {0: 2, 1: 3}  # one whole free core, siblings together


def test_ht_aware_maps_guest_siblings_to_host_siblings() -> None:
    host = HostPool(HostTopology.flat(set(range(8)), smt=2), housekeeping=frozenset({0}))
    siblings = (frozenset({0, 1}), frozenset({2, 3}))
    vm = VmView("a", frozenset(range(4)), quota=4, policy="ht-aware", guest_siblings=siblings)
    result = plan([0, 1, 2, 3], vm, host, {})
    topo = host.topology
    for group in siblings:
        assert len({topo.siblings(result.mapping[v]) for v in group}) == 1
    assert 0 not in result.mapping.values()
    # The pool policy on the same request does not promise that.
    assert set(plan([0, 1, 2, 3], vm.__class__(**{**vm.__dict__, "policy": "pool"}), host,
                    {}).mapping) == {0, 1, 2, 3}  # fmt: skip


def test_quota_refusal_names_the_quota_and_keeps_held_vcpus() -> None:
    host = HostPool(HostTopology.flat(set(range(4))))
    vm = VmView("a", frozenset(range(4)), quota=1, policy="pool")
    first = plan([3], vm, host, {})
    held = apply_plan({}, first)
    result = plan([0, 3], vm, host, held)
    assert result.mapping == first.mapping
    assert "quota of 1" in result.refused[0].message


def test_pool_exhausted_is_a_reason() -> None:
    host = HostPool(HostTopology.flat({0, 1}), pool=frozenset({1}))
    vm = VmView("a", frozenset(range(2)), quota=2, policy="pool")
    result = plan([0, 1], vm, host, {1: ("b", 0)})
    assert result.mapping == {}
    assert all(r.code == RefusalCode.POOL_EXHAUSTED for r in result.refused.values())
    assert all(r.message.startswith("pool exhausted") for r in result.refused.values())


def test_ht_aware_keeps_a_pinned_vcpu_whose_group_the_quota_cannot_hold_whole() -> None:
    """Found by hypothesis: vCPU 8 held a pCPU; its sibling 9 was wanted too but the quota
    (2, one spent on vCPU 0) could not pin both, yet the next plan of the same request moved
    8 away "to regroup" and gave its room to vCPU 2 — churn on an unchanged request."""
    host = HostPool(HostTopology.flat({0, 1, 2, 3}, smt=2))
    siblings = tuple(frozenset({i, i + 1}) for i in range(0, 10, 2))
    vm = VmView("b", frozenset(range(10)), quota=2, policy="ht-aware", guest_siblings=siblings)
    first = plan([8], vm, host, {})
    after = apply_plan({}, first)
    second = plan([0, 2, 8, 9], vm, host, after)
    assert second.mapping[8] == first.mapping[8]
    again = plan([0, 2, 8, 9], vm, host, apply_plan(after, second))
    assert dict(again.mapping) == dict(second.mapping)
