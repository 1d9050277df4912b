"""cgroup v2 isolation of libvirt domains' pins, inside libvirt's own cgroups.

libvirt keeps each vCPU thread in its own threaded cgroup and extpv must not move it out::

    machine.slice/                               cpuset.cpus.exclusive += pCPUs pinned below
      machine-qemu\\x2d<id>\\x2d<name>.scope/     cpuset.cpus.exclusive += this domain's pCPUs
        libvirt/                                 cpuset.cpus.exclusive += this domain's pCPUs
          emulator/   (libvirt's)                untouched (its cpuset.cpus is empty unless
                                                 the domain pins it: then trimmed, below)
          vcpu<N>/    (libvirt's, pinned)        cpuset.cpus = <p> (libvirt's own pin, made
                                                 first through the API), cpuset.cpus.exclusive
                                                 = <p>, cpuset.cpus.partition = isolated
          vcpu<M>/    (libvirt's, not pinned)    untouched, or trimmed (below)

So a pin is a *remote* partition (kernel >= 6.7): only ``cpuset.cpus.exclusive`` up the chain
(every ancestor of the vCPU cgroup below the root), no partition root in between; libvirt's
own cgroups keep their type, their threads and their ``cpuset.cpus``. The layout is not
assumed: the chain is the vCPU thread's cgroup as ``/proc/<tid>/cgroup`` shows it (libvirt
without systemd uses ``machine/qemu-<id>-<name>.libvirt-qemu/…``), and its last component
must be libvirt's ``vcpu<N>``.

**Trimmed siblings.** The kernel refuses to make a partition whose CPUs meet a sibling's
*explicit* ``cpuset.cpus`` ("not exclusive"), and (Linux 6.12) writing such a ``cpuset.cpus``
beside a valid partition invalidates it. libvirt writes ``cpuset.cpus`` of a vCPU cgroup on
every live pin, also on extpv's undo (the previous pinning, often every host CPU), and of all
of them when the domain pins (``<vcpu cpuset=…>``, ``<emulatorpin>``). So while a partition
holds ``p``, each sibling with an explicit ``cpuset.cpus`` containing ``p`` has ``p`` removed
(what the kernel's partition takes from its effective CPUs anyway), and gets back exactly its
value once no partition beside it needs the room — unless libvirt wrote it meanwhile (then
libvirt's value stands). A sibling that would be left with no CPU (e.g. ``<emulatorpin>`` on
``p`` alone) makes the pin refused, with that reason. A partition the kernel invalidated
because libvirt wrote a sibling is enabled again by the next :meth:`LibvirtPartitions.sync`.

**extpv.slice.** Sibling ``cpuset.cpus.exclusive`` may not overlap, and the plain-QEMU cgroup
v2 backend gives ``extpv.slice`` every pool CPU: :attr:`LibvirtPartitions.lend` (the backend's
:meth:`~pvhost.placement.cgroup2.Cgroup2Backend.lend_exclusive`) takes the CPUs libvirt pins
hold out of it, between the shrinking and the growing pass.

**Undo and crashes.** Before its first write to a cgroup, its values from before are recorded
(``<state_dir>/libvirt-cgroup2.json``, replaced atomically), and an entry goes only once the
value is back. :meth:`LibvirtPartitions.sync` makes the kernel match the pins it is given and
puts back every recorded cgroup no pin needs: idempotent, so after a kill -9 of pvhost the
next sync (at reconcile) converges. A cgroup that is gone (the domain stopped: libvirt removed
its scope) needs nothing back; its record is dropped.

**Older kernels.** Without remote partitions (Linux < 6.7, mode ``local``) isolation needs a
partition root at every level: ``machine.slice`` itself, the parent of every domain on the
host, would become a partition holding only the pinned CPUs and confine every other domain to
them. extpv does not do that: the pin is libvirt's alone, reported ``restricted``
(``libvirt-no-remote-partitions``). Kernels without partitions: ``no-partitions``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pvhost.errors import PartitionInvalid, PlacementError
from pvhost.files import load_model, replace_file
from pvhost.placement.base import read_cpus, read_setting, read_text, write_text
from pvhost.placement.chain import partition_reason
from pvhost.placement.isolation import Isolation, cgroup2_isolation
from pvproto import CpuListError, format_cpulist, parse_cpulist

__all__ = ["LibvirtPartitions", "leaf_of", "no_remote_isolation"]

_log = logging.getLogger(__name__)

Mode = Literal["remote", "local", "restricted"]


class _Leaf(BaseModel):
    """A vCPU cgroup made a partition: its values before."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    exclusive: str = ""
    partition: str = "member"


class _Ancestor(BaseModel):
    """A cgroup above one: its ``cpuset.cpus.exclusive`` before."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    exclusive: str = ""


class _Sibling(BaseModel):
    """A cgroup beside one, trimmed: its ``cpuset.cpus`` before, and what extpv wrote."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cpus: str
    wrote: str


class _File(BaseModel):
    """Per cgroup (``/…`` below the root), its values before extpv's first write to it."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    leaves: dict[str, _Leaf] = {}
    ancestors: dict[str, _Ancestor] = {}
    siblings: dict[str, _Sibling] = {}


def leaf_of(cgroup: str, vcpu: int) -> str | None:
    """``cgroup`` (a vCPU thread's, ``/…``) when it is libvirt's ``vcpu<N>`` cgroup of that vCPU
    below at least one ancestor that is not the root, else None (nothing to isolate there)."""
    parts = [p for p in cgroup.split("/") if p]
    if len(parts) < 2 or parts[-1] != f"vcpu{vcpu}":
        return None
    return "/" + "/".join(parts)


def _ancestors(leaf: str) -> list[str]:
    """Every cgroup above ``leaf`` below the root, top first."""
    parts = [p for p in leaf.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _cpus(text: str) -> frozenset[int]:
    try:
        return parse_cpulist(text)
    except CpuListError as err:
        raise PlacementError(f"unreadable CPU list {text!r}: {err}") from err


def no_remote_isolation() -> Isolation:
    """A libvirt pin on a cgroup v2 kernel without remote partitions (see module doc)."""
    return Isolation(
        "restricted",
        "libvirt-no-remote-partitions",
        "pinned through libvirt (vcpupin): this kernel has no remote partitions (Linux < 6.7), "
        "and isolating inside libvirt's cgroups would make machine.slice, the parent of every "
        "domain, a partition root that confines all other domains to the pinned CPUs: not "
        "done, other tasks may still run on its pCPU",
    )


class LibvirtPartitions:
    """Remote isolated partitions at libvirt's ``vcpuN`` cgroups (see the module doc)."""

    def __init__(self, root: Path, state_path: Path, mode: Mode) -> None:
        self.root = root
        self.path = state_path
        self.mode: Mode = mode
        #: Called with the pCPUs libvirt pins hold (about to hold) before ancestors grow, so
        #: a sibling's exclusive CPUs (extpv.slice's) make room; None where nothing must.
        self.lend: Callable[[frozenset[int]], None] | None = None
        self._state = self._load()

    # -- state file --------------------------------------------------------------------------
    def _load(self) -> _File:
        return load_model(self.path, _File, _log) or _File()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, self._state.model_dump_json().encode())

    def saved(self) -> dict[str, dict[str, dict[str, str]]]:
        """What is recorded to be put back, per kind and cgroup (for status and tests)."""
        st = self._state
        return {
            "leaves": {k: v.model_dump() for k, v in sorted(st.leaves.items())},
            "ancestors": {k: v.model_dump() for k, v in sorted(st.ancestors.items())},
            "siblings": {k: v.model_dump() for k, v in sorted(st.siblings.items())},
        }

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    # -- what the placement calls -------------------------------------------------------------
    def isolates(self) -> bool:
        return self.mode == "remote"

    def isolation(self, leaf: str) -> Isolation:
        """What a pin at ``leaf`` (``""``: the thread is in no vcpuN cgroup) achieved, read
        back from the kernel now."""
        if self.mode == "local":
            return no_remote_isolation()
        if self.mode == "restricted":
            return cgroup2_isolation(None)
        if not leaf:
            return Isolation(
                "restricted",
                "no-vcpu-cgroup",
                "pinned through libvirt (vcpupin): the vCPU thread is in no libvirt vcpuN "
                "cgroup (libvirt without the cpuset controller?), so extpv made no partition",
            )
        return cgroup2_isolation(read_setting(self._dir(leaf) / "cpuset.cpus.partition"))

    def check(self, leaf: str, pcpu: int) -> list[tuple[str, str, str]]:
        """How the kernel disagrees with a partition at ``leaf`` on ``pcpu``: (what, expected,
        found) per mismatch; nothing where this mode makes none."""
        if not self.isolates() or not leaf:
            return []
        path = self._dir(leaf)
        out = []
        state = read_setting(path / "cpuset.cpus.partition")
        if state != "isolated":
            out.append(("partition", f"{leaf} isolated", state))
        exclusive = read_setting(path / "cpuset.cpus.exclusive")
        if exclusive != str(pcpu):
            out.append(("cpuset", f"{leaf} exclusive {pcpu}", exclusive))
        return out

    def sync(self, target: Mapping[str, int]) -> None:
        """Make the kernel hold exactly ``target`` (leaf cgroup → pCPU) as isolated remote
        partitions, and put back every recorded cgroup no pin needs any more.

        PlacementError before any write for a pin that cannot be made (a sibling left without
        a CPU); PartitionInvalid with the kernel's reason when a partition reads back invalid
        (the caller undoes the pin and syncs again without it)."""
        if not self.isolates():
            target = {}
        st = self._state
        target = {leaf: p for leaf, p in target.items() if self._dir(leaf).is_dir()}
        held = frozenset(target.values())
        below: dict[str, set[int]] = {}
        for leaf, pcpu in target.items():
            for anc in _ancestors(leaf):
                below.setdefault(anc, set()).add(pcpu)
        trims = self._plan_trims(target)  # may refuse: before anything is recorded or written

        # Record every cgroup's values before the first write to it (kill -9 safe).
        changed = False
        for leaf in target:
            # A vCPU trimmed as a sibling before its own pin: libvirt's pin wrote its
            # cpuset.cpus since, and libvirt's undo will write it again: nothing to put back.
            changed |= st.siblings.pop(leaf, None) is not None
            if leaf not in st.leaves:
                path = self._dir(leaf)
                st.leaves[leaf] = _Leaf(
                    exclusive=read_text(path / "cpuset.cpus.exclusive"),
                    partition=_valid_or_member(read_text(path / "cpuset.cpus.partition")),
                )
                changed = True
        for anc in below:
            if anc not in st.ancestors:
                path = self._dir(anc)
                st.ancestors[anc] = _Ancestor(exclusive=read_text(path / "cpuset.cpus.exclusive"))
                changed = True
        for sib, (now, new) in trims.items():
            old = st.siblings.get(sib)
            if old is None or old.wrote != new:
                # Trimmed further (another partition beside it): its value before stays the
                # one from before extpv's first trim, unless libvirt wrote it since.
                before = old.cpus if old is not None and old.wrote == now else now
                st.siblings[sib] = _Sibling(cpus=before, wrote=new)
                changed = True
        if changed:
            self._save()

        # 0. Room beside each partition first (it only shrinks sets): a vCPU cgroup whose
        #    partition goes below may already hold libvirt's wide cpuset.cpus (its undo ran
        #    before a kill -9 let extpv's), and the kernel refuses to clear its exclusive CPUs
        #    while that overlaps a partition beside it (EINVAL, measured on 6.12).
        for rel, (_now, new) in sorted(trims.items()):
            path = self._dir(rel)
            if read_text(path / "cpuset.cpus") != new:
                write_text(path / "cpuset.cpus", new)
        # 1. Partitions no pin needs: back to what they were, before any room is given back.
        for rel, leaf_was in sorted(st.leaves.items()):
            if rel in target:
                continue
            path = self._dir(rel)
            if path.is_dir():
                if read_text(path / "cpuset.cpus.partition") != leaf_was.partition:
                    write_text(path / "cpuset.cpus.partition", leaf_was.partition)
                if read_text(path / "cpuset.cpus.exclusive") != leaf_was.exclusive:
                    write_text(path / "cpuset.cpus.exclusive", leaf_was.exclusive)
            del st.leaves[rel]
            changed = True
        # 2. Siblings no partition beside needs trimmed: exactly their value back, unless
        #    libvirt wrote them meanwhile (its value stands).
        for rel, sib_was in sorted(st.siblings.items()):
            if rel in trims:
                continue
            path = self._dir(rel)
            if path.is_dir() and read_text(path / "cpuset.cpus") == sib_was.wrote:
                write_text(path / "cpuset.cpus", sib_was.cpus)
            del st.siblings[rel]
            changed = True
        # 3. Ancestors: shrink bottom-up (a child's exclusive CPUs must stay within its
        #    parent's), lend extpv.slice's room, then grow top-down.
        ancestors = sorted(st.ancestors, key=lambda rel: rel.count("/"))
        want = {
            rel: _cpus(st.ancestors[rel].exclusive) | frozenset(below.get(rel, ()))
            for rel in ancestors
        }
        for rel in reversed(ancestors):
            path = self._dir(rel)
            if not path.is_dir():
                continue
            now_cpus = read_cpus(path / "cpuset.cpus.exclusive")
            if now_cpus - want[rel]:
                write_text(path / "cpuset.cpus.exclusive", format_cpulist(now_cpus & want[rel]))
        if self.lend is not None:
            self.lend(held)
        for rel in ancestors:
            path = self._dir(rel)
            if path.is_dir() and read_cpus(path / "cpuset.cpus.exclusive") != want[rel]:
                text = format_cpulist(want[rel]) if rel in below else st.ancestors[rel].exclusive
                write_text(path / "cpuset.cpus.exclusive", text)
            if rel not in below:
                del st.ancestors[rel]
                changed = True
        if changed:
            self._save()
        # 4. The partitions, each read back.
        for leaf, pcpu in sorted(target.items()):
            self._enable(leaf, pcpu)

    def _plan_trims(self, target: Mapping[str, int]) -> dict[str, tuple[str, str]]:
        """Sibling → (its cpuset.cpus now, what it must become) beside the target partitions."""
        by_dir: dict[Path, set[int]] = {}
        for leaf, pcpu in target.items():
            by_dir.setdefault(self._dir(leaf).parent, set()).add(pcpu)
        leaves = {self._dir(leaf) for leaf in target}
        out: dict[str, tuple[str, str]] = {}
        for parent, pcpus in sorted(by_dir.items()):
            for sib in sorted(p for p in parent.iterdir() if p.is_dir() and p not in leaves):
                cpus_file = sib / "cpuset.cpus"
                if not cpus_file.exists():
                    continue
                now = read_text(cpus_file)
                if not now:
                    continue  # inherits: the partition takes its CPUs from it by itself
                rel = "/" + str(sib.relative_to(self.root))
                # Already trimmed by extpv (and not rewritten by libvirt since): from its
                # value before, so a trim no partition needs any more is undone, not kept.
                was = self._state.siblings.get(rel)
                cpus = _cpus(was.cpus if was is not None and was.wrote == now else now)
                if not cpus & pcpus:
                    continue
                rest = cpus - pcpus
                if not rest:
                    raise PlacementError(
                        f"libvirt's cgroup {rel} is confined to pCPU(s) "
                        f"{format_cpulist(cpus)} (the domain pins it there): an isolated "
                        f"partition on {format_cpulist(frozenset(pcpus))} beside it would "
                        "leave it no CPU"
                    )
                out[rel] = (now, format_cpulist(rest))
        return out

    def _enable(self, leaf: str, pcpu: int) -> None:
        path = self._dir(leaf)
        if read_text(path / "cpuset.cpus.exclusive") != str(pcpu):
            write_text(path / "cpuset.cpus.exclusive", str(pcpu))
        state = read_text(path / "cpuset.cpus.partition")
        if state.startswith("isolated invalid"):
            # Invalidated while it held (libvirt wrote a sibling's cpuset.cpus over it, Linux
            # 6.12): the room is made again above, so it can be enabled again.
            write_text(path / "cpuset.cpus.partition", "member")
            state = "member"
        if state != "isolated":
            write_text(path / "cpuset.cpus.partition", "isolated")
        state = read_text(path / "cpuset.cpus.partition")
        if state != "isolated":
            raise PartitionInvalid(
                f"{leaf} → pCPU {pcpu}: partition is {state!r}", partition_reason(state) or state
            )


def _valid_or_member(state: str) -> str:
    """The partition state to put back: an invalid one (left by a crash) is not worth keeping."""
    return state if partition_reason(state) is None else "member"
