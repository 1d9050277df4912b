"""The host service: VM sessions, placement under one lock, reconcile at start, undo at stop.

Placement is global (a pCPU is never given to two vCPUs of any VM), so every plan + apply
runs under one lock; backend calls run in a worker thread so cgroupfs writes never stall
the other VMs' channels, and nothing that waits on a VM (QMP round trips, the guest
channel) ever runs under the lock, so one VM cannot slow another's placements.

The service owns each VM's :class:`VmRecord` (policy, quota, remap switch, the guest's
latest wish and the answer it got); the VM's :class:`~pvhost.session.VmSession` owns its
connections and is driven only through the operations it exposes.

What runs in each VM is chosen per VM among the paravirtual services (:mod:`pvhost.services`,
plugins found through the ``extpv.services`` entry points); this placement engine is the host
side of the built-in one, ``affinity``, which answers the guest's ``AffinityUpdate`` only
while that service is enabled for the VM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvhost.config import Config, PolicyName
from pvhost.errors import (
    GuestRequestError,
    HostError,
    PartitionInvalid,
    PlacementError,
    QmpError,
)
from pvhost.libvirt import LibvirtLink, LibvirtVcpus
from pvhost.metrics import Metrics
from pvhost.placement import Cgroup1Backend, Cgroup2Backend, PlacementBackend, detect_backend
from pvhost.placement.isolation import Isolation
from pvhost.placement.libvirt import LibvirtPlacement
from pvhost.placement.libvirt_cgroup2 import LibvirtPartitions
from pvhost.placement.stages import StageClock
from pvhost.policy import HostPool, Plan, VmView, eligible_cpus, guest_sibling_groups, plan
from pvhost.programs import program_from_file, sign_program
from pvhost.qmp import QmpMonitor, qemu_pid_of
from pvhost.refusal import Refusal, RefusalCode
from pvhost.registry import DirWatcher, VmSpec, scan_vms
from pvhost.services import ServiceContext, ServiceManager, ServicesSettings, discover
from pvhost.session import Monitor, VmSession
from pvhost.topology import HostTopology, read_host_topology
from pvproto import AffinityResult, AffinityUpdate, VcpuPlacement, build_schemas

__all__ = ["Service", "VmRecord"]

_log = logging.getLogger(__name__)


@dataclass
class VmRecord:
    """What the service keeps for one VM: its settings and the guest's latest wish."""

    spec: VmSpec
    session: VmSession
    task: asyncio.Task[None]
    #: The configured policy; ``remap`` switches ht-aware on and off at runtime.
    policy: PolicyName
    quota: int
    remap: bool
    #: The guest's latest request (the whole wanted set) and its sequence number.
    wanted: list[int] = field(default_factory=list)
    last_seq: int | None = None
    #: When it came (``time.monotonic()``), for the age ``pvctl status`` shows.
    last_request_at: float | None = None
    #: The placements answered to it.
    last_result: list[VcpuPlacement] = field(default_factory=list)
    #: What each of its pins achieved (vCPU → pCPU and isolation), read back after the last
    #: change: answered to the guest and exported in /metrics.
    isolation: dict[int, tuple[int, Isolation]] = field(default_factory=dict)
    #: (QEMU pid, sorted (vCPU, tid) pairs) the backend was last attached with.
    attached: tuple[int, tuple[tuple[int, int], ...]] | None = None
    #: Set once the VM is being closed: its session stopped, then everything undone. The
    #: record stays listed until the undo is done, so "gone from status" means "undone".
    closing: asyncio.Task[None] | None = None

    @property
    def effective_policy(self) -> PolicyName:
        if self.remap:
            return "ht-aware"
        return "pool" if self.policy == "ht-aware" else self.policy


class Service:
    def __init__(
        self,
        config: Config,
        *,
        topology: HostTopology | None = None,
        backend: PlacementBackend | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.topology = topology or read_host_topology()
        placement = config.placement
        self.pool = HostPool(self.topology, placement.housekeeping_cpus(), placement.pool_cpus())
        self.backend = backend or detect_backend(
            placement.cgroup_root,
            config.service.state_dir,
            placement.backend,
            placement.group,
            tuple(placement.isolate_from),
            cgroup1_mode=placement.cgroup1_mode,
        )
        self.metrics = metrics or Metrics()
        #: Where the time of the change under way goes (shared with the backend; one change
        #: at a time, under the lock).
        self.stages = StageClock()
        self.backend.stages = self.stages
        self.services = ServiceManager(
            discover(), _services_settings(config), self._service_context, self.metrics
        )
        self.vms: dict[str, VmRecord] = {}
        self._lock = asyncio.Lock()
        self._watcher: DirWatcher | None = None
        self._stopping = False
        #: Attachments adopted at start (VM → QEMU pid and vCPU tids), used once per VM.
        self._adopted_attach: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {}
        self.adopted: dict[str, dict[int, int]] = {}
        #: Domains libvirt runs (``[libvirt] enabled``), placed through libvirt itself.
        self.libvirt: LibvirtLink | None = None
        self.libvirt_placement: LibvirtPlacement | None = None
        if config.libvirt.enabled:
            self.libvirt = LibvirtLink(
                config.libvirt.uri, config.libvirt.max_backoff, self._libvirt_changed
            )
            self.libvirt_placement = LibvirtPlacement(
                self.libvirt, config.service.state_dir / "libvirt.json"
            )
            if isinstance(self.backend, Cgroup1Backend):
                # isolate_from withholds the domains' pinned pCPUs too (docs/libvirt.md).
                self.backend.also_held = self.libvirt_placement.held
                self.libvirt_placement.isolate = self.backend.isolate_held
                self.libvirt_placement.read_back = self.backend.threads_achieved
            elif isinstance(self.backend, Cgroup2Backend):
                # extpv.slice keeps the pCPUs of libvirt pins out of its exclusive CPUs. The
                # partitions at libvirt's vcpuN cgroups come at start: their mode is the
                # backend's, known once it is set up.
                self.backend.lent = self.libvirt_placement.held

    def _service_context(self, name: str) -> ServiceContext:
        return ServiceContext(
            signing_key=self.config.service.signing_key,
            log=logging.getLogger(f"pvhost.services.{name}"),
            host=self,
        )

    @property
    def sessions(self) -> dict[str, VmSession]:
        return {name: vm.session for name, vm in self.vms.items()}

    # -- start / stop ----------------------------------------------------------------------
    async def start(self) -> None:
        build_schemas()  # now, not on some VM's first frame of a kind (pvproto.messages)
        key = self.config.service.signing_key
        if not key.exists():
            # Not an error (a lab guest may run trust = "any"), but never silent.
            _log.warning(
                "no signing key at %s: programs go unsigned and guests with trust = "
                '"signed" will refuse them; create one with `pvctl keygen %s`',
                key,
                key.parent,
            )
        eligible = eligible_cpus(self.pool)
        if self.config.placement.isolate_from and self.backend.name != "cgroup1":
            _log.warning(
                "placement.isolate_from is for cgroup v1 cpusets; the %s backend isolates "
                "pinned pCPUs with partitions instead, so it is not used",
                self.backend.name,
            )
        await asyncio.to_thread(self.backend.setup, eligible)
        lv = self.libvirt_placement
        backend = self.backend
        if lv is not None and isinstance(backend, Cgroup2Backend):
            # Partitions at libvirt's own vcpuN cgroups, in the mode the backend's setup found.
            partitions = LibvirtPartitions(
                backend.root,
                self.config.service.state_dir / "libvirt-cgroup2.json",
                backend.mode,
            )
            partitions.lend = backend.lend_exclusive
            lv.partitions = partitions
            _log.info(
                "libvirt domains: %s",
                "isolated: each pinned pCPU becomes an isolated remote partition at libvirt's "
                "own vcpuN cgroup"
                if partitions.isolates()
                else "restricted: " + partitions.isolation("").reason,
            )
            try:
                # After a kill -9: the partitions exactly as the recorded pins imply.
                await asyncio.to_thread(lv.sync_partitions)
            except PlacementError as err:
                # Not fatal: plain-QEMU VMs are served; each pin's read-back says what holds.
                _log.error("libvirt domains: partitions could not be restored: %s", err)
        specs = scan_vms(self.config)
        monitors = await self._probe(specs)
        live = {name: {i: v.tid for i, v in m.vcpus.items()} for name, m in monitors.items()}
        self.adopted = await asyncio.to_thread(self.backend.reconcile, live)
        for name, monitor in monitors.items():
            if name in self.adopted:
                first = next(iter(monitor.vcpus.values()))
                self._adopted_attach[name] = (qemu_pid_of(first.tid), _tids(monitor.vcpus))
        await self.services.reconcile(specs)
        for name, spec in specs.items():
            self._start_session(spec, monitors.get(name))
        runtime = self.config.service.runtime_dir
        runtime.mkdir(parents=True, exist_ok=True)
        self._watcher = DirWatcher(runtime, self.rescan)
        if self.libvirt is not None:
            try:
                await self.libvirt.start()
            except ImportError as err:
                # Plain-QEMU VMs are served all the same; status says why libvirt is not.
                self.libvirt.state = (
                    f"unavailable: the libvirt Python binding is not installed ({err})"
                )
                _log.error("libvirt: %s", self.libvirt.state)
        _log.info(
            "pvhost started: backend %s, isolation %s; %d VM(s), adopted %s",
            self.backend.name,
            await asyncio.to_thread(self.backend.isolation_summary),
            len(specs),
            self.adopted,
        )

    async def _probe(self, specs: dict[str, VmSpec]) -> dict[str, QmpMonitor]:
        """Connect to every VM's QMP once (short deadline), to reconcile against live vCPUs."""

        async def one(spec: VmSpec) -> tuple[str, QmpMonitor | None]:
            monitor = QmpMonitor(spec.qmp, spec.name)
            try:
                await monitor.connect(timeout=3)
            except QmpError:
                return spec.name, None
            return spec.name, monitor

        found = await asyncio.gather(*(one(s) for s in specs.values() if s.qmp.exists()))
        return {name: m for name, m in found if m is not None}

    async def stop(self) -> None:
        """Close every VM (waiting for closes already under way), then remove extpv's cgroup."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.close()
        closes = [self._close(name) for name in list(self.vms)]
        await asyncio.gather(*(task for task in closes if task is not None))
        if self.libvirt is not None:
            await self.libvirt.stop()
        async with self._lock:
            await asyncio.to_thread(self.backend.teardown)
        await self.services.close()

    def rescan(self) -> None:
        if self._stopping:
            return
        specs = scan_vms(self.config)
        if self.libvirt is not None:
            for domain in self.libvirt.domains.values():
                specs.setdefault(
                    domain.name,
                    VmSpec(domain.name, Path(), domain.agent, source="libvirt", libvirt=domain),
                )
        for name in set(self.vms) - set(specs):
            self._close(name)
        for name, spec in specs.items():
            vm = self.vms.get(name)
            if vm is None:
                self._start_session(spec, None)
            elif spec.libvirt is not None and vm.spec != spec:
                self._close(name)  # restarted or its channel moved: a fresh session follows
        if self.libvirt is not None and self.libvirt.connected:
            self._reap_libvirt_orphans()

    def _libvirt_changed(self) -> None:
        """libvirt's view changed, or pvhost (re)connected to it: follow, then re-plan each
        domain's wish (an undo that failed while libvirtd was away is done now)."""
        self.rescan()
        for vm in list(self.vms.values()):
            if vm.spec.libvirt is not None and vm.last_seq is not None and vm.closing is None:
                asyncio.get_running_loop().create_task(self.reapply(vm), name="libvirt-reapply")

    def _reap_libvirt_orphans(self) -> None:
        """Undo pins recorded for libvirt domains that no session serves (a kill -9 of pvhost,
        then the domain stopped or lost its channel)."""
        placement = self.libvirt_placement
        assert placement is not None
        orphans = [name for name in placement.pins() if name not in self.vms]
        if orphans:
            asyncio.get_running_loop().create_task(self._reap(orphans), name="libvirt-reap")

    async def _reap(self, names: list[str]) -> None:
        for name in names:
            if name not in self.vms:
                await self._undo(name, None)

    def _start_session(self, spec: VmSpec, monitor: QmpMonitor | None) -> None:
        placement = self.config.placement
        new_monitor = None
        if spec.libvirt is not None:
            domain = spec.libvirt
            assert self.libvirt_placement is not None
            self.libvirt_placement.known(spec.name, domain.uuid, domain.domain)

            def new_monitor() -> Monitor:
                return LibvirtVcpus(domain)

        session = VmSession(
            spec.name,
            spec.qmp,
            spec.agent,
            applier=self.apply,
            on_gone=self.vm_gone,
            on_vcpus_changed=self.vcpus_changed,
            program=None,
            on_vcpus_found=self.vcpus_found,
            rate=placement.rate,
            burst=placement.burst,
            max_backoff=self.config.service.max_backoff,
            keepalive=self.config.service.keepalive,
            max_frames_per_s=self.config.service.max_frames_per_s,
            monitor=new_monitor,
            port_events=spec.libvirt is None,
            services=self.services,
        )
        self.services.add_vm(session)
        policy = spec.policy or placement.policy
        task = asyncio.get_running_loop().create_task(session.run(monitor), name=f"vm-{spec.name}")
        self.vms[spec.name] = VmRecord(
            spec=spec,
            session=session,
            task=task,
            policy=policy,  # type: ignore[arg-type]  # validated by the config model
            quota=spec.quota if spec.quota is not None else placement.quota,
            remap=policy == "ht-aware",
            attached=self._adopted_attach.pop(spec.name, None),
        )
        self.metrics.vms.set(len(self.vms))

    def _close(self, name: str) -> asyncio.Task[None] | None:
        """The one task that closes VM ``name`` (started on the first ask), or None if unknown.

        The record stays in :attr:`vms` until the undo is done: ``stop()`` waits for a close
        the watcher began, and a VM whose directory comes back meanwhile is picked up by the
        rescan that ends the close."""
        vm = self.vms.get(name)
        if vm is None:
            return None
        if vm.closing is None:
            vm.closing = asyncio.get_running_loop().create_task(
                self._stop_session(name, vm), name=f"close-{name}"
            )
        return vm.closing

    async def _stop_session(self, name: str, vm: VmRecord) -> None:
        try:
            # Services undo what needs QEMU's monitor while the session still holds it.
            await self.services.closing(name)
            vm.task.cancel()
            try:
                await vm.task
            except asyncio.CancelledError:
                pass
            except Exception:
                # A session that died of an error must not stop the undo of its VM, of the
                # other VMs, or of extpv's own cgroup (stop() runs this for every VM).
                _log.exception("%s: the VM's session had ended with an error", name)
            await self.services.vm_gone(name)
            await self._undo(name, vm)  # also when the affinity service failed for the VM
        finally:
            await self.services.remove_vm(name)
            del self.vms[name]
            self.metrics.vms.set(len(self.vms))
        self.rescan()

    async def vm_gone(self, name: str) -> None:
        """The VM's QEMU went away (QMP closed): each of its services undoes its part (the
        affinity service: all its placements, :meth:`undo_placements`)."""
        await self.services.vm_gone(name)

    async def undo_placements(self, name: str, *, forget_wish: bool = False) -> None:
        """Undo every placement of VM ``name`` (``forget_wish``: the affinity service was
        disabled for it, so a later remap or hot-plug places nothing)."""
        vm = self.vms.get(name)
        if forget_wish and vm is not None:
            vm.wanted, vm.last_seq, vm.last_result = [], None, []
        await self._undo(name, vm)

    async def _undo(self, name: str, vm: VmRecord | None) -> None:
        async with self._lock:
            if vm is not None:
                vm.attached, vm.isolation = None, {}
            try:
                await asyncio.to_thread(self._backend_of(name).detach, name)
            except PlacementError as err:
                _log.error("%s: undo failed: %s", name, err)
            self._count_pinned()

    async def vcpus_changed(self, name: str) -> None:
        """QEMU reported a vCPU hot(un)plug: plan the guest's current wish against the new map."""
        await self.vcpus_found(name)
        vm = self.vms.get(name)
        if vm is not None and vm.last_seq is not None:
            await self.reapply(vm)

    async def vcpus_found(self, name: str) -> None:
        """The VM's monitor has (re)read its vCPU threads. A backend that attaches at discovery
        (cgroup v1 ``resident``) prepares them now, so that the guest's first pin is as cheap
        as any other; the undo is the VM's detach, as for an attach at its first pin."""
        vm = self.vms.get(name)
        if vm is None or not self.backend.attaches_at_discovery:
            return
        if self._backend_of(name) is not self.backend or not self.services.enabled(
            name, "affinity"
        ):
            return  # libvirt places its domains; a VM without the service is left alone
        tids = {i: v.tid for i, v in vm.session.vcpus.items()}
        if not tids:
            return
        async with self._lock:
            if vm.closing is not None or self._stopping:
                return
            try:
                await asyncio.to_thread(self._attach, vm, self.backend, tids)
            except (HostError, OSError) as err:
                # Not fatal: the first pin attaches again and is refused with the reason.
                _log.error("%s: preparing the vCPU threads failed: %s", name, err)

    # -- placement -----------------------------------------------------------------------------
    def _backend_of(self, name: str) -> PlacementBackend | LibvirtPlacement:
        """Where VM ``name``'s pins live: libvirt for its domains, extpv's cgroups otherwise."""
        lv = self.libvirt_placement
        if lv is not None:
            vm = self.vms.get(name)
            if (vm is not None and vm.spec.libvirt is not None) or (
                vm is None and name in lv.pins()
            ):
                return lv
        return self.backend

    def _all_pins(self) -> dict[str, dict[int, int]]:
        pins = dict(self.backend.pins())
        if self.libvirt_placement is not None:
            pins.update(self.libvirt_placement.pins())
        return pins

    def _backend_name(self, vm: VmRecord) -> str:
        return "libvirt" if vm.spec.libvirt is not None else self.backend.name

    def _vm(self, name: str) -> VmRecord:
        try:
            return self.vms[name]
        except KeyError:
            raise HostError(
                f"no VM named {name!r} (known: {', '.join(sorted(self.vms)) or 'none'})"
            ) from None

    async def apply(self, name: str, update: AffinityUpdate) -> AffinityResult:
        """Plan and enact a guest's request; every wanted vCPU gets an answer of its seq.

        Raises GuestRequestError (the VM's wish unchanged) when the guest wants more vCPUs
        than its VM has: the protocol allows 8,192, and planning and answering each of them
        would let a small VM cost the host what a huge one does.
        """
        self.metrics.requests.labels(vm=name).inc()
        vm = self._vm(name)
        if not self.services.enabled(name, "affinity"):
            raise GuestRequestError(
                f"the affinity service is not enabled for VM {name} "
                f"(pvctl service enable {name} affinity)"
            )
        await self._check_size(vm, update)
        vm.wanted, vm.last_seq = list(update.wanted), update.seq
        vm.last_request_at = time.monotonic()
        return await self._place(vm, update.seq)

    async def _check_size(self, vm: VmRecord, update: AffinityUpdate) -> None:
        count = len(vm.session.vcpus)
        if not count or len(update.wanted) <= count:
            return  # (no monitor: every vCPU is refused with no-monitor, nothing is planned)
        # A vCPU may have been hot-plugged since the map was read: ask QEMU once (outside the
        # lock) before refusing.
        count = len(await vm.session.refresh_vcpus())
        if count and len(update.wanted) > count:
            raise GuestRequestError(
                f"AffinityUpdate seq {update.seq} wants {len(update.wanted)} vCPUs; "
                f"VM {vm.spec.name} has {count}"
            )

    async def reapply(self, vm: VmRecord) -> None:
        """Re-plan the current wish (after a remap switch or a hot-plug); tell the guest."""
        seq = vm.last_seq if vm.last_seq is not None else 0
        result = await self._place(vm, seq)
        if vm.last_seq is not None:
            vm.session.send_result(result)

    async def _place(self, vm: VmRecord, seq: int) -> AffinityResult:
        wanted = list(vm.wanted)
        if set(wanted) - set(vm.session.vcpus):
            # A vCPU we do not know may have been hot-plugged (QEMU emits no event for an add
            # until the guest acknowledges it): ask QEMU again, before taking the lock.
            await vm.session.refresh_vcpus()
        begun = time.monotonic()
        try:
            async with self._lock:
                self.stages.reset()
                self.stages.add("queue", time.monotonic() - begun)
                placements = await self._apply_locked(vm, wanted)
                self._report_stages(vm.spec.name, seq, wanted, begun)
        except (HostError, OSError) as err:
            # Whatever failed (a vCPU thread gone, an undo that could not complete) is
            # reported for every wanted vCPU; the session and the service go on.
            _log.error("%s: applying %s failed: %s", vm.spec.name, wanted, err)
            refusal = Refusal(RefusalCode.PLACEMENT_FAILED, f"placement failed: {err}")
            placements = [(v, refusal) for v in wanted]
        except Exception as err:
            # Last resort: a bug must not silence the session; the guest still gets answers.
            _log.exception("%s: applying %s failed", vm.spec.name, wanted)
            refusal = Refusal(RefusalCode.INTERNAL, f"internal error: {err}")
            placements = [(v, refusal) for v in wanted]
        answer = []
        for vcpu, outcome in placements:
            if isinstance(outcome, Refusal):
                self.metrics.refusals.labels(code=outcome.code.value).inc()
                answer.append(outcome.placement(vcpu))
            else:
                pcpu, isolation = vm.isolation.get(vcpu, (outcome, None))
                if pcpu != outcome or isolation is None:  # not read back: claim nothing
                    isolation = Isolation("restricted", "unknown", "not read back")
                answer.append(
                    VcpuPlacement(
                        vcpu=vcpu, pcpu=outcome, isolation=isolation.mode,
                        isolation_reason=isolation.reason or None,
                    )
                )  # fmt: skip
        vm.last_result = answer
        return AffinityResult(
            seq=seq, placements=answer, policy=vm.effective_policy, backend=self._backend_name(vm)
        )

    async def _apply_locked(
        self, vm: VmRecord, wanted: list[int]
    ) -> list[tuple[int, int | Refusal]]:
        vcpus = vm.session.vcpus
        if not vcpus:
            refusal = Refusal(RefusalCode.NO_MONITOR, "the VM's QMP monitor is not connected")
            return [(v, refusal) for v in wanted]
        if vm.spec.libvirt is not None and vm.spec.libvirt.static_pins:
            refusal = Refusal(RefusalCode.STATIC_PINNING, vm.spec.libvirt.static_pins)
            return [(v, refusal) for v in wanted]
        view = VmView(
            name=vm.spec.name,
            vcpus=frozenset(vcpus),
            quota=vm.quota,
            policy=vm.effective_policy,
            guest_siblings=guest_sibling_groups({i: v.core_key for i, v in vcpus.items()}),
        )
        allocations = {
            p: (name, v) for name, pins in self._all_pins().items() for v, p in pins.items()
        }
        with self.stages.stage("policy"):
            result = plan(wanted, view, self.pool, allocations)
        tids = {i: v.tid for i, v in vcpus.items()}
        with self.metrics.apply_seconds.time():
            handed = time.perf_counter()
            failures = await asyncio.to_thread(self._enact, vm, result, tids, handed)
        self._count_pinned()
        out: list[tuple[int, int | Refusal]] = []
        for vcpu in wanted:
            if vcpu in failures:
                out.append((vcpu, failures[vcpu]))
            elif vcpu in result.mapping:
                out.append((vcpu, result.mapping[vcpu]))
            else:
                out.append((vcpu, result.refused[vcpu]))
        return out

    def _enact(
        self, vm: VmRecord, result: Plan, tids: dict[int, int], handed: float
    ) -> dict[int, Refusal]:
        """Make the backend match the plan: unpin what changed, then pin. Runs in a thread
        (``handed``: when the loop handed it over, ``time.perf_counter()``)."""
        self.stages.add("thread", time.perf_counter() - handed)
        name = vm.spec.name
        backend = self._backend_of(name)
        if isinstance(backend, PlacementBackend):
            self._attach(vm, backend, tids)
        current = backend.pins().get(name, {})
        for vcpu, pcpu in current.items():
            if result.mapping.get(vcpu) != pcpu:
                backend.unpin(name, vcpu)
        failures: dict[int, Refusal] = {}
        for vcpu, pcpu in sorted(result.mapping.items()):
            if current.get(vcpu) == pcpu:
                continue
            try:
                backend.pin(name, vcpu, tids[vcpu], pcpu)
            except PartitionInvalid as err:
                failures[vcpu] = Refusal(
                    RefusalCode.PARTITION_INVALID, f"partition invalid ({err.reason}); undone"
                )
            except PlacementError as err:
                failures[vcpu] = Refusal(RefusalCode.PLACEMENT_FAILED, f"placement failed: {err}")
        with self.stages.stage("readback"):
            vm.isolation = self._read_isolation(name, backend)
        return failures

    def _report_stages(self, name: str, seq: int, wanted: list[int], begun: float) -> None:
        """Export where the change's time went (``begun``: host CLOCK_MONOTONIC when the
        service took the guest's update; the debug line lets a bench line it up)."""
        for stage, seconds in self.stages.spent.items():
            self.metrics.stage_seconds.labels(stage=stage).observe(seconds)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s: applied seq %d wanted %s begun %.6f done %.6f stages %s",
                name, seq, wanted, begun, time.monotonic(), self.stages.summary(),
            )  # fmt: skip

    @staticmethod
    def _attach(vm: VmRecord, backend: PlacementBackend, tids: dict[int, int]) -> None:
        """``backend.attach`` unless it was attached with these threads already. Runs in a
        thread, under the lock."""
        key = tuple(sorted(tids.items()))
        if vm.attached is None or vm.attached[1] != key:
            pid = qemu_pid_of(next(iter(tids.values())))
            backend.attach(vm.spec.name, pid, tids)
            vm.attached = (pid, key)

    def _read_isolation(
        self, name: str, backend: PlacementBackend | LibvirtPlacement
    ) -> dict[int, tuple[int, Isolation]]:
        """What VM ``name``'s pins achieved, read back now."""
        pins = backend.pins().get(name, {})
        try:
            achieved = backend.achieved().get(name, {})
        except (PlacementError, OSError) as err:
            _log.warning("%s: cannot read back what its pins achieved: %s", name, err)
            achieved = {}
        unknown = Isolation("restricted", "unknown", "not read back (see pvhost's log)")
        return {v: (p, achieved.get(v, unknown)) for v, p in pins.items()}

    # -- operator actions ------------------------------------------------------------------------
    async def set_remap(self, name: str, on: bool) -> dict[str, Any]:
        vm = self._vm(name)
        vm.remap = on
        await self.reapply(vm)
        return {"vm": name, "remap": on, "policy": vm.effective_policy}

    async def release(self, name: str) -> dict[str, Any]:
        vm = self._vm(name)
        async with self._lock:
            backend = self._backend_of(name)
            pins = backend.pins().get(name, {})
            await asyncio.to_thread(backend.detach, name)
            vm.attached, vm.isolation = None, {}
            self._count_pinned()
        if vm.last_seq is not None:
            refusal = Refusal(RefusalCode.RELEASED, "released by the host operator")
            for _ in vm.wanted:
                self.metrics.refusals.labels(code=refusal.code.value).inc()
            vm.last_result = [refusal.placement(v) for v in vm.wanted]
            vm.session.send_result(
                AffinityResult(
                    seq=vm.last_seq,
                    placements=vm.last_result,
                    policy=vm.effective_policy,
                    backend=self._backend_name(vm),
                )
            )
        return {"vm": name, "released": {str(v): p for v, p in pins.items()}}

    async def load_program(self, name: str, path: Path, timeout: float = 60) -> dict[str, Any]:
        vm = self._vm(name)
        program = sign_program(*program_from_file(path), self.config.service.signing_key)
        verdict = await vm.session.load_program(program, timeout)
        return verdict.model_dump(exclude={"request_id"})

    async def unload_program(self, name: str, path_or_id: str) -> dict[str, Any]:
        vm = self._vm(name)
        program_id = (
            program_from_file(Path(path_or_id))[0] if Path(path_or_id).exists() else path_or_id
        )
        vm.session.unload_program(program_id)
        return {"vm": name, "unloaded": program_id}

    def service_list(self) -> dict[str, Any]:
        return self.services.catalogue()

    async def service_enable(self, name: str, service: str) -> dict[str, Any]:
        return await self.services.enable(name, service)

    async def service_disable(self, name: str, service: str) -> dict[str, Any]:
        return await self.services.disable(name, service)

    def _count_pinned(self) -> None:
        self.metrics.pinned.set(sum(len(p) for p in self._all_pins().values()))
        self.metrics.set_isolation({name: vm.isolation for name, vm in self.vms.items()})

    def status(self) -> dict[str, Any]:
        placed = self.backend.describe()
        placed_vms = dict(placed["vms"])
        if self.libvirt_placement is not None:
            try:
                achieved = self.libvirt_placement.achieved()
            except (PlacementError, OSError) as err:
                _log.warning("libvirt domains: cannot read back what pins achieved: %s", err)
                achieved = {}
            unknown = Isolation("restricted", "unknown", "not read back (see pvhost's log)")
            for name, vcpus in self.libvirt_placement.describe()["vms"].items():
                placed_vms[name] = {
                    v: {**achieved.get(name, {}).get(int(v), unknown).fields(), **info}
                    for v, info in vcpus.items()
                }
        vms = {}
        for name, vm in sorted(self.vms.items()):
            vms[name] = {
                **vm.session.describe(),
                "policy": vm.effective_policy,
                "remap": vm.remap,
                "quota": vm.quota,
                "wanted": vm.wanted,
                "last_seq": vm.last_seq,
                "last_request_age_s": None
                if vm.last_request_at is None
                else round(time.monotonic() - vm.last_request_at, 1),
                "result": [p.model_dump() for p in vm.last_result],
                "placements": placed_vms.get(name, {}),
                "services": self.services.describe(name),
            }
        return {
            "backend": self.backend.name,
            "isolation": self.backend.isolation_summary(),
            "backend_detail": {k: v for k, v in placed.items() if k != "vms"},
            "host": {
                "online": sorted(self.topology.online),
                "housekeeping": sorted(self.pool.housekeeping),
                "eligible": sorted(eligible_cpus(self.pool)),
            },
            "vms": vms,
            "orphans": {k: v for k, v in placed_vms.items() if k not in self.vms},
            "libvirt": self.libvirt.describe() if self.libvirt is not None else None,
        }

    async def verify(self) -> dict[str, Any]:
        """``pvctl verify``: re-check every recorded placement against the kernel."""
        async with self._lock:  # not while a plan is being enacted
            findings = await asyncio.to_thread(self.backend.verify)
            if self.libvirt_placement is not None:
                findings += await asyncio.to_thread(self.libvirt_placement.verify)
            count = sum(len(p) for p in self._all_pins().values())
        return {"placements": count, "findings": [f.model_dump() for f in findings]}


def _tids(vcpus: dict[int, Any]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((i, v.tid) for i, v in vcpus.items()))


def _services_settings(config: Config) -> ServicesSettings:
    services = config.services
    return ServicesSettings(
        default=tuple(services.enabled),
        per_vm={n: tuple(v.services) for n, v in config.vms.items() if v.services is not None},
        tables=services.tables(),
        hook_timeout=services.hook_timeout,
        max_records_per_s=services.max_records_per_s,
        max_queued=services.max_queued,
    )
