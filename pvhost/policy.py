"""Placement policies: pure functions from a request to a plan or refusals.

Input: the vCPUs a VM wants pinned now (the *whole* set: requests are idempotent),
the VM, the host, and every current allocation (pCPU → (vm, vCPU)). Output: a
:class:`Plan` mapping each wanted vCPU to a pCPU, or refusing it with a reason.

Invariants every policy keeps (tests/unit/test_host_policy.py checks them with hypothesis):

* a pCPU is never given to two vCPUs (of this VM or another);
* housekeeping CPUs and CPUs outside the pool are never handed out;
* a VM never holds more than its quota of pinned vCPUs;
* a vCPU that stays wanted keeps its pCPU when that is still valid (no churn);
* the empty request releases everything the VM held.

Policies and their mapping:

``identity``  the paper's: vCPU *i* → pCPU *i*; refused when pCPU *i* is not available.
``pool``      exclusive pCPUs from the pool, whole free cores first, filling a core's SMT
              siblings for the same VM before starting another core.
``ht-aware``  guest SMT sibling vCPUs land on SMT siblings of one host core; a group that no
              free core can hold is placed CPU by CPU like ``pool``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pvhost.config import PolicyName
from pvhost.refusal import Refusal, RefusalCode
from pvhost.topology import HostTopology
from pvproto import format_cpulist

__all__ = [
    "Allocations",
    "HostPool",
    "Plan",
    "VmView",
    "apply_plan",
    "eligible_cpus",
    "guest_sibling_groups",
    "plan",
]

#: pCPU → (VM name, vCPU index).
Allocations = Mapping[int, tuple[str, int]]


@dataclass(frozen=True)
class HostPool:
    """What the host offers: its topology, the housekeeping CPUs and the configured pool."""

    topology: HostTopology
    housekeeping: frozenset[int] = frozenset()
    #: None: every online CPU that is not housekeeping.
    pool: frozenset[int] | None = None


@dataclass(frozen=True)
class VmView:
    """What a policy needs to know about one VM."""

    name: str
    #: The vCPU indices QEMU reports for it.
    vcpus: frozenset[int]
    quota: int
    policy: PolicyName
    #: Guest SMT sibling groups (from QMP ``props``), each a set of vCPU indices.
    guest_siblings: tuple[frozenset[int], ...] = ()


@dataclass(frozen=True)
class Plan:
    """The outcome for one request: every wanted vCPU is either mapped or refused."""

    vm: str
    policy: PolicyName
    mapping: Mapping[int, int] = field(default_factory=dict)
    refused: Mapping[int, Refusal] = field(default_factory=dict)


def eligible_cpus(host: HostPool) -> frozenset[int]:
    """The pCPUs any VM may ever be given."""
    base = host.topology.online if host.pool is None else host.pool & host.topology.online
    return base - host.housekeeping


def guest_sibling_groups(props: Mapping[int, tuple[int, int, int]]) -> tuple[frozenset[int], ...]:
    """Group vCPUs by (socket, die, core) from QMP ``props``: same core → SMT siblings."""
    groups: dict[tuple[int, int, int], set[int]] = {}
    for vcpu, key in props.items():
        groups.setdefault(key, set()).add(vcpu)
    return tuple(frozenset(g) for g in sorted(groups.values(), key=min) if len(g) > 1)


def apply_plan(allocations: Allocations, result: Plan) -> dict[int, tuple[str, int]]:
    """Allocations after ``result``: the VM's old entries replaced by its plan."""
    after = {p: owner for p, owner in allocations.items() if owner[0] != result.vm}
    for vcpu, pcpu in result.mapping.items():
        after[pcpu] = (result.vm, vcpu)
    return after


def plan(wanted: Iterable[int], vm: VmView, host: HostPool, allocations: Allocations) -> Plan:
    """Decide where each wanted vCPU of ``vm`` goes. Pure: no I/O, no state."""
    wanted_set = frozenset(wanted)
    refused: dict[int, Refusal] = {}
    for vcpu in sorted(wanted_set - vm.vcpus):
        refused[vcpu] = Refusal(
            RefusalCode.UNKNOWN_VCPU, f"unknown vCPU {vcpu}: the VM has vCPUs {_fmt(vm.vcpus)}"
        )
    known = sorted(wanted_set & vm.vcpus)
    eligible = eligible_cpus(host)
    others = {p: owner for p, owner in allocations.items() if owner[0] != vm.name}
    current = {vcpu: p for p, (name, vcpu) in allocations.items() if name == vm.name}

    if vm.policy == "identity":
        mapping = _identity(known, host, eligible=eligible, others=others, refused=refused)
        return _with_quota(vm, mapping, current=current, refused=refused)
    keep = _sticky(known, vm, host, current=current, eligible=eligible, others=others)
    free = eligible - set(others) - set(keep.values())
    todo = [v for v in known if v not in keep]
    # Quota first: never plan more than the VM may hold (kept vCPUs count first).
    room = max(vm.quota - len(keep), 0)
    for vcpu in todo[room:]:
        refused[vcpu] = Refusal(RefusalCode.QUOTA, f"quota of {vm.quota} pinned vCPUs reached")
    todo = todo[:room]
    if vm.policy == "ht-aware":
        placed = _ht_aware(todo, vm, host.topology, free, keep)
    else:
        placed = _fill(todo, host.topology, free, owned=set(keep.values()))
    for vcpu in todo:
        if vcpu not in placed:
            refused[vcpu] = Refusal(
                RefusalCode.POOL_EXHAUSTED,
                f"pool exhausted: no free pCPU among {_fmt(eligible)} "
                f"({len(others)} held by other VMs)",
            )
    return Plan(vm.name, vm.policy, {**keep, **placed}, refused)


def _identity(
    known: list[int],
    host: HostPool,
    *,
    eligible: frozenset[int],
    others: Allocations,
    refused: dict[int, Refusal],
) -> dict[int, int]:
    mapping: dict[int, int] = {}
    for vcpu in known:
        if vcpu not in host.topology.online:
            refused[vcpu] = Refusal(
                RefusalCode.IDENTITY_UNAVAILABLE, f"identity: pCPU {vcpu} is not an online host CPU"
            )
        elif vcpu in host.housekeeping:
            refused[vcpu] = Refusal(
                RefusalCode.IDENTITY_UNAVAILABLE,
                f"identity: pCPU {vcpu} is a housekeeping CPU, kept for the host "
                '(placement.housekeeping); policy "pool" would place this vCPU elsewhere',
            )
        elif vcpu not in eligible:
            refused[vcpu] = Refusal(
                RefusalCode.IDENTITY_UNAVAILABLE,
                f"identity: pCPU {vcpu} is outside the pool {_fmt(eligible)}",
            )
        elif vcpu in others:
            name, other = others[vcpu]
            refused[vcpu] = Refusal(
                RefusalCode.IDENTITY_UNAVAILABLE,
                f"identity: pCPU {vcpu} is held by VM {name} vCPU {other}",
            )
        else:
            mapping[vcpu] = vcpu
    return mapping


def _with_quota(
    vm: VmView,
    mapping: dict[int, int],
    *,
    current: Mapping[int, int],
    refused: dict[int, Refusal],
) -> Plan:
    # Already-held vCPUs win the quota, then the lowest indices.
    order = sorted(mapping, key=lambda v: (v not in current, v))
    kept = order[: vm.quota]
    for vcpu in order[vm.quota :]:
        refused[vcpu] = Refusal(RefusalCode.QUOTA, f"quota of {vm.quota} pinned vCPUs reached")
    return Plan(vm.name, vm.policy, {v: mapping[v] for v in sorted(kept)}, refused)


def _sticky(
    known: list[int],
    vm: VmView,
    host: HostPool,
    *,
    current: Mapping[int, int],
    eligible: frozenset[int],
    others: Allocations,
) -> dict[int, int]:
    """Placements of still-wanted vCPUs that stay valid, at most ``quota`` of them."""
    keep = {v: current[v] for v in known if v in current and current[v] in eligible}
    keep = {v: p for v, p in keep.items() if p not in others}
    if vm.policy == "ht-aware":
        # A guest sibling group stays where it is when all its wanted members fit on the one
        # host core it occupies; otherwise it is re-placed whole, but only if some host core
        # can hold it (else moving it would just churn).
        wanted = set(known)
        for group in vm.guest_siblings:
            members = group & wanted
            kept = [v for v in members if v in keep]
            if not kept:
                continue
            if len(members) + sum(1 for v in keep if v not in group) > vm.quota:
                continue  # the quota cannot pin the whole group: moving it would just churn
            usable = eligible - set(others) - {p for v, p in keep.items() if v not in group}
            cores = {host.topology.siblings(keep[v]) for v in kept}
            if len(cores) == 1 and len(next(iter(cores)) & usable) >= len(members):
                continue
            if any(len(core & usable) >= len(members) for core in host.topology.cores):
                for v in kept:
                    del keep[v]
    return dict(sorted(keep.items())[: vm.quota])


def _core_order(topology: HostTopology, free: frozenset[int], owned: set[int]) -> list[int]:
    """Free CPUs, best first: cores this VM already uses, then wholly free cores, then the rest."""

    def key(cpu: int) -> tuple[int, int, int]:
        core = topology.siblings(cpu)
        if core & owned:
            rank = 0
        elif core <= free:
            rank = 1
        else:
            rank = 2
        return (rank, min(core), cpu)

    return sorted(free, key=key)


def _fill(
    todo: list[int], topology: HostTopology, free: frozenset[int], owned: set[int]
) -> dict[int, int]:
    placed: dict[int, int] = {}
    owned = set(owned)
    available = set(free)
    for vcpu in todo:
        order = _core_order(topology, frozenset(available), owned)
        if not order:
            break
        placed[vcpu] = order[0]
        owned.add(order[0])
        available.discard(order[0])
    return placed


def _ht_aware(
    todo: list[int],
    vm: VmView,
    topology: HostTopology,
    free: frozenset[int],
    keep: Mapping[int, int],
) -> dict[int, int]:
    placed: dict[int, int] = {}
    available = set(free)
    todo_set = set(todo)
    # New members of a group whose other members stay: onto their core's free siblings.
    for group in vm.guest_siblings:
        held = [keep[v] for v in group if v in keep]
        if not held:
            continue
        spare = sorted(topology.siblings(held[0]) & available)
        for vcpu in sorted(group & todo_set):
            if spare:
                placed[vcpu] = spare.pop(0)
                available.discard(placed[vcpu])
    todo_set -= set(placed)
    groups = [sorted(g & todo_set) for g in vm.guest_siblings if len(g & todo_set) > 1]
    grouped = {v for g in groups for v in g} | set(placed)
    for members in sorted(groups, key=lambda g: (-len(g), g[0])):
        # Exact fits first (no core left half-used), then the smallest core that holds them.
        fits = [c & available for c in topology.cores if len(c & available) >= len(members)]
        if not fits:  # no free host core holds them: placed one by one below
            grouped -= set(members)
            continue
        core = min(fits, key=lambda c: (len(c) - len(members), min(c)))
        for vcpu, cpu in zip(members, sorted(core), strict=False):
            placed[vcpu] = cpu
            available.discard(cpu)
    rest = [v for v in todo if v not in grouped]
    owned = set(keep.values()) | set(placed.values())
    placed.update(_fill(rest, topology, frozenset(available), owned))
    return placed


def _fmt(cpus: Iterable[int]) -> str:
    return format_cpulist(cpus) or "(none)"
