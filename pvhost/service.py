"""The host service: VM sessions, placement under one lock, reconcile at start, undo at stop.

Placement is global (a pCPU is never given to two vCPUs of any VM), so every plan + apply
runs under one lock; backend calls run in a worker thread so cgroupfs writes never stall
the other VMs' channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from pvhost.config import Config, PolicyName
from pvhost.errors import ChannelError, HostError, PartitionInvalid, PlacementError, QmpError
from pvhost.metrics import Metrics, reason_code
from pvhost.placement import PlacementBackend, detect_backend
from pvhost.policy import HostPool, Plan, VmView, eligible_cpus, guest_sibling_groups, plan
from pvhost.programs import affinity_program, program_from_file, sign_payload
from pvhost.qmp import QmpMonitor, qemu_pid_of
from pvhost.registry import DirWatcher, VmSpec, scan_vms
from pvhost.session import VmSession
from pvhost.topology import HostTopology, read_host_topology
from pvproto import AffinityResult, VcpuPlacement

__all__ = ["Service"]

_log = logging.getLogger(__name__)


class Service:
    def __init__(
        self,
        config: Config,
        *,
        topology: HostTopology | None = None,
        backend: PlacementBackend | None = None,
    ) -> None:
        self.config = config
        self.topology = topology or read_host_topology()
        placement = config.placement
        self.pool = HostPool(self.topology, placement.housekeeping_cpus(), placement.pool_cpus())
        self.backend = backend or detect_backend(
            placement.cgroup_root, config.service.state_dir, placement.backend, placement.group
        )
        self.metrics = Metrics()
        self.sessions: dict[str, VmSession] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._specs: dict[str, VmSpec] = {}
        self._attached: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {}
        self._lock = asyncio.Lock()
        self._watcher: DirWatcher | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.adopted: dict[str, dict[int, int]] = {}

    # -- start / stop ----------------------------------------------------------------------
    async def start(self) -> None:
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
        await asyncio.to_thread(self.backend.setup, eligible)
        specs = scan_vms(self.config)
        monitors = await self._probe(specs)
        live = {name: {i: v.tid for i, v in m.vcpus.items()} for name, m in monitors.items()}
        self.adopted = await asyncio.to_thread(self.backend.reconcile, live)
        for name, monitor in monitors.items():
            pins = self.adopted.get(name)
            if pins is not None:
                first = next(iter(monitor.vcpus.values()))
                self._attached[name] = (qemu_pid_of(first.tid), self._tids(monitor))
        for name, spec in specs.items():
            self._start_session(spec, monitors.get(name))
        runtime = self.config.service.runtime_dir
        runtime.mkdir(parents=True, exist_ok=True)
        self._watcher = DirWatcher(runtime, self.rescan)
        _log.info(
            "pvhost started: backend %s, %d VM(s), adopted %s",
            self.backend.name,
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
        if self._watcher is not None:
            self._watcher.close()
        for name in list(self._tasks):
            await self._stop_session(name)
        await asyncio.to_thread(self.backend.teardown)

    def rescan(self) -> None:
        specs = scan_vms(self.config)
        for name in set(self._tasks) - set(specs):
            task = asyncio.get_running_loop().create_task(self._stop_session(name))
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)
        for name, spec in specs.items():
            if name not in self._tasks:
                self._start_session(spec, None)

    def _start_session(self, spec: VmSpec, monitor: QmpMonitor | None) -> None:
        placement = self.config.placement
        session = VmSession(
            spec.name,
            spec.qmp,
            spec.agent,
            applier=self.apply,
            on_gone=self.vm_gone,
            program=lambda: affinity_program(
                self.config.service.affinity_program, self.config.service.signing_key
            ),
            rate=placement.rate,
            burst=placement.burst,
            max_backoff=self.config.service.max_backoff,
            policy=spec.policy or placement.policy,
            quota=spec.quota if spec.quota is not None else placement.quota,
        )
        self._specs[spec.name] = spec
        self.sessions[spec.name] = session
        self._tasks[spec.name] = asyncio.get_running_loop().create_task(
            session.run(monitor), name=f"vm-{spec.name}"
        )
        self.metrics.vms = len(self.sessions)

    async def _stop_session(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        session = self.sessions.pop(name, None)
        self._specs.pop(name, None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                # A session that died of an error must not stop the undo of its VM, of the
                # other VMs, or of extpv's own cgroup (stop() runs this for every VM).
                _log.exception("%s: the VM's session had ended with an error", name)
        if session is not None:
            await self.vm_gone(session)
        self.metrics.vms = len(self.sessions)

    async def vm_gone(self, session: VmSession) -> None:
        """The VM went away (QMP closed or its directory vanished): undo all its placements."""
        async with self._lock:
            self._attached.pop(session.name, None)
            try:
                await asyncio.to_thread(self.backend.detach, session.name)
            except PlacementError as err:
                _log.error("%s: undo failed: %s", session.name, err)
            self._count_pinned()

    # -- placement -----------------------------------------------------------------------------
    @staticmethod
    def _tids(monitor: QmpMonitor) -> tuple[tuple[int, int], ...]:
        return tuple(sorted((i, v.tid) for i, v in monitor.vcpus.items()))

    def effective_policy(self, session: VmSession) -> PolicyName:
        if session.remap:
            return "ht-aware"
        return "pool" if session.policy == "ht-aware" else session.policy  # type: ignore[return-value]

    async def apply(self, session: VmSession, wanted: list[int]) -> AffinityResult:
        """Plan and enact ``wanted`` for ``session``'s VM; every wanted vCPU gets an answer."""
        self.metrics.requests[session.name] += 1
        async with self._lock:
            try:
                placements = await self._apply_locked(session, wanted)
            except (HostError, OSError) as err:
                # Whatever failed (a vCPU thread gone, an undo that could not complete) is
                # reported for every wanted vCPU; the session and the service go on.
                _log.error("%s: applying %s failed: %s", session.name, wanted, err)
                reason = f"placement failed: {err}"[:1024]
                placements = [VcpuPlacement(vcpu=v, refused=reason) for v in wanted]
        for p in placements:
            if p.refused is not None:
                self.metrics.refusals[reason_code(p.refused)] += 1
        session.status.last_result = [p.model_dump() for p in placements]
        return AffinityResult(
            seq=0,
            placements=placements,
            policy=self.effective_policy(session),
            backend=self.backend.name,
        )

    async def _apply_locked(self, session: VmSession, wanted: list[int]) -> list[VcpuPlacement]:
        monitor = session.monitor
        if monitor is not None and set(wanted) - set(monitor.vcpus):
            # A vCPU we do not know may have been hot-plugged (QEMU emits no event for an add
            # until the guest acknowledges it): ask QEMU again before refusing it.
            with contextlib.suppress(QmpError):
                await monitor.refresh()
        if monitor is None or not monitor.vcpus:
            return [
                VcpuPlacement(vcpu=v, refused="the VM's QMP monitor is not connected")
                for v in wanted
            ]
        vm = VmView(
            name=session.name,
            vcpus=frozenset(monitor.vcpus),
            quota=session.quota,
            policy=self.effective_policy(session),
            guest_siblings=guest_sibling_groups({i: v.core_key for i, v in monitor.vcpus.items()}),
        )
        allocations = {
            p: (name, v) for name, pins in self.backend.pins().items() for v, p in pins.items()
        }
        result = plan(wanted, vm, self.pool, allocations)
        tids = {i: v.tid for i, v in monitor.vcpus.items()}
        started = time.perf_counter()
        failures = await asyncio.to_thread(self._enact, session, result, tids)
        self.metrics.observe_apply(time.perf_counter() - started)
        self._count_pinned()
        out = []
        for vcpu in wanted:
            if vcpu in failures:
                out.append(VcpuPlacement(vcpu=vcpu, refused=failures[vcpu]))
            elif vcpu in result.mapping:
                out.append(VcpuPlacement(vcpu=vcpu, pcpu=result.mapping[vcpu]))
            else:
                out.append(VcpuPlacement(vcpu=vcpu, refused=result.refused.get(vcpu, "refused")))
        return out

    def _enact(self, session: VmSession, result: Plan, tids: dict[int, int]) -> dict[int, str]:
        """Make the backend match the plan: unpin what changed, then pin. Runs in a thread."""
        name = session.name
        key = tuple(sorted(tids.items()))
        if self._attached.get(name, (0, ()))[1] != key:
            pid = qemu_pid_of(next(iter(tids.values())))
            self.backend.attach(name, pid, tids)
            self._attached[name] = (pid, key)
        current = self.backend.pins().get(name, {})
        for vcpu, pcpu in current.items():
            if result.mapping.get(vcpu) != pcpu:
                self.backend.unpin(name, vcpu)
        failures: dict[int, str] = {}
        for vcpu, pcpu in sorted(result.mapping.items()):
            if current.get(vcpu) == pcpu:
                continue
            try:
                self.backend.pin(name, vcpu, tids[vcpu], pcpu)
            except PartitionInvalid as err:
                failures[vcpu] = f"partition invalid ({err.reason}); undone"
            except PlacementError as err:
                failures[vcpu] = f"placement failed: {err}"[:1024]
        return failures

    # -- operator actions ------------------------------------------------------------------------
    def _session(self, name: str) -> VmSession:
        try:
            return self.sessions[name]
        except KeyError:
            raise HostError(
                f"no VM named {name!r} (known: {', '.join(sorted(self.sessions)) or 'none'})"
            ) from None

    async def set_remap(self, name: str, on: bool) -> dict[str, Any]:
        session = self._session(name)
        session.remap = on
        await session.reapply()
        return {"vm": name, "remap": on, "policy": self.effective_policy(session)}

    async def release(self, name: str) -> dict[str, Any]:
        session = self._session(name)
        async with self._lock:
            pins = self.backend.pins().get(name, {})
            await asyncio.to_thread(self.backend.detach, name)
            self._attached.pop(name, None)
            self._count_pinned()
        if session.status.last_seq is not None:
            result = AffinityResult(
                seq=session.status.last_seq,
                placements=[
                    VcpuPlacement(vcpu=v, refused="released by the host operator")
                    for v in session.status.wanted
                ],
                policy=self.effective_policy(session),
                backend=self.backend.name,
            )
            with contextlib.suppress(ChannelError, OSError):
                session.send(result)
        return {"vm": name, "released": {str(v): p for v, p in pins.items()}}

    async def load_program(self, name: str, path: Path, timeout: float = 60) -> dict[str, Any]:
        session = self._session(name)
        program_id, kind, payload = program_from_file(path)
        signature = sign_payload(payload, self.config.service.signing_key)
        verdict = await session.load_program(program_id, kind, payload, signature, timeout)
        return verdict.model_dump(exclude={"request_id"})

    async def unload_program(self, name: str, path_or_id: str) -> dict[str, Any]:
        session = self._session(name)
        program_id = (
            program_from_file(Path(path_or_id))[0] if Path(path_or_id).exists() else path_or_id
        )
        session.unload_program(program_id)
        return {"vm": name, "unloaded": program_id}

    def _count_pinned(self) -> None:
        self.metrics.pinned = sum(len(p) for p in self.backend.pins().values())

    def status(self) -> dict[str, Any]:
        placed = self.backend.describe()
        vms = {}
        for name, session in sorted(self.sessions.items()):
            st = session.status
            vms[name] = {
                "qmp": st.qmp,
                "channel": st.channel,
                "guest": st.guest_version,
                "policy": self.effective_policy(session),
                "remap": session.remap,
                "quota": session.quota,
                "vcpus": {
                    str(i): {"tid": v.tid, "socket": v.socket, "core": v.core, "thread": v.thread}
                    for i, v in sorted(session.vcpus.items())
                },
                "wanted": st.wanted,
                "last_seq": st.last_seq,
                "result": st.last_result,
                "programs": st.programs,
                "placements": placed["vms"].get(name, {}),
            }
        return {
            "backend": self.backend.name,
            "backend_detail": {k: v for k, v in placed.items() if k != "vms"},
            "host": {
                "online": sorted(self.topology.online),
                "housekeeping": sorted(self.pool.housekeeping),
                "eligible": sorted(eligible_cpus(self.pool)),
            },
            "vms": vms,
            "orphans": {k: v for k, v in placed["vms"].items() if k not in self.sessions},
        }

    async def verify(self) -> dict[str, Any]:
        """``pvctl verify``: re-check every recorded placement against the kernel."""
        async with self._lock:  # not while a plan is being enacted
            findings = await asyncio.to_thread(self.backend.verify)
            count = sum(len(p) for p in self.backend.pins().values())
        return {"placements": count, "findings": [f.model_dump() for f in findings]}
