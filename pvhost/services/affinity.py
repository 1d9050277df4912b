"""The affinity service, the first plugin: guest CPU-affinity hints → isolated host placements.

Its program is ``bpf/affinity.bpf.c`` (``[service] affinity_program`` overrides it). Agents of
this version still track affinity in the guest and send the whole wish as ``AffinityUpdate``;
the host's placement engine (:class:`pvhost.service.Service`: planning under one lock,
cgroup backends, reconcile at start) answers them, rate-limited per VM by the VM's session.
This plugin is what ties that engine into the service model: it names the program to inject,
undoes a VM's placements when its QEMU goes away or when the service is disabled for it, and
reports the VM's wish and pins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pvhost.errors import ChannelError
from pvhost.programs import SignedAffinityProgram, SignedProgram
from pvhost.services.base import ServiceContext, ServicePlugin

__all__ = ["AffinityService"]


class AffinityService(ServicePlugin):
    name = "affinity"
    summary = "guest thread CPU affinity → exclusive, isolated host pCPUs for the wanted vCPUs"

    def __init__(self, context: ServiceContext, config: None = None) -> None:
        super().__init__(context, config)
        if context.host is None:
            raise RuntimeError("the affinity service runs inside pvhost's Service")
        self.host = context.host
        settings = self.host.config.service
        self._program = SignedAffinityProgram(settings.affinity_program, settings.signing_key)
        #: Why the program cannot be injected now (not built), shown in status.
        self.missing = ""

    def programs(self) -> Sequence[SignedProgram]:
        try:
            program = self._program()
        except ChannelError as err:  # not built: an operator's fix, not the plugin's failure
            self.missing = str(err)
            return []
        self.missing = ""
        return [program]

    async def on_vm_gone(self, vm: str) -> None:
        await self.host.undo_placements(vm)

    async def on_disable(self, vm: str) -> None:
        await self.host.undo_placements(vm, forget_wish=True)

    def status(self, vm: str) -> Mapping[str, Any]:
        record = self.host.vms.get(vm)
        pins = self.host.backend.pins().get(vm, {})
        out: dict[str, Any] = {
            "wanted": list(record.wanted) if record is not None else [],
            "pinned": {str(v): p for v, p in sorted(pins.items())},
        }
        if self.missing:
            out["program"] = f"not injected: {self.missing}"
        return out

    def metrics(self) -> Mapping[str, float]:
        return {"pinned_vcpus": float(sum(len(p) for p in self.host.backend.pins().values()))}
