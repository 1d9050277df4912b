"""What a paravirtual service is to pvhost: the plugin interface (docs/services.md).

A service is one unit: the eBPF program(s) it injects into a guest, the layout of the records
those programs write to their ring buffers (decoded here, on the host: the guest agent only
forwards bytes), its host-side logic (hooks below), its status, its metrics and its config
section (``[services.NAME]`` in ``pvhost.toml``, validated by :attr:`ServicePlugin.Config`).

pvhost finds services through the entry-point group ``extpv.services``; each entry point names
a :class:`ServicePlugin` subclass, constructed once per daemon with a :class:`ServiceContext`.
The daemon calls its hooks through :class:`pvhost.services.manager.ServiceManager`, which
treats every plugin as fallible: a hook that raises, runs past its deadline or returns
something of the wrong type disables that service for that VM (logged, shown in ``pvctl
status``); the other services and the other VMs go on.

Hooks are coroutines; the daemon runs one VM's calls into one service in order, on its event
loop, each under a deadline (``[services] hook_timeout``). A hook must not block the loop
(use ``asyncio.to_thread`` for blocking work): a coroutine that never yields cannot be
stopped by a deadline.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel

from extpv.vcpus import VcpuThread
from pvhost.programs import SignedProgram, sign_program
from pvproto import BaseMessage, GuestTopology, MapContents, ProgramKind

if TYPE_CHECKING:
    from pvhost.service import Service

__all__ = [
    "QMP_ALLOWED",
    "QOM_READABLE",
    "QOM_WRITABLE",
    "EventError",
    "ServiceContext",
    "ServicePlugin",
    "VmHandle",
    "qmp_refusal",
]

#: The QMP commands a service may send through :meth:`VmHandle.qmp` (never the monitor itself).
QMP_ALLOWED = frozenset(
    {"balloon", "query-balloon", "query-memory-size-summary", "qom-list", "qom-get", "qom-set"}
)
#: The QOM properties ``qom-get`` may read and ``qom-set`` may write: the balloon's guest
#: statistics and how often QEMU asks the guest for them (any other property of any device,
#: e.g. a disk's backing file, stays out of a service's reach).
QOM_READABLE = frozenset({"guest-stats", "guest-stats-polling-interval"})
QOM_WRITABLE = frozenset({"guest-stats-polling-interval"})


def qmp_refusal(command: str, arguments: Mapping[str, Any]) -> str | None:
    """Why a service may not send this QMP command (None: it may)."""
    if command not in QMP_ALLOWED:
        return f"QMP command {command!r} is not one a service may send"
    allowed = {"qom-get": QOM_READABLE, "qom-set": QOM_WRITABLE}.get(command)
    if allowed is not None and arguments.get("property") not in allowed:
        return f"{command} of property {arguments.get('property')!r}: a service may only " + (
            f"use {sorted(allowed)}"
        )
    return None


#: What ``status()`` and ``metrics()`` may return: JSON values.
JsonValue = Any


class EventError(ValueError):
    """A record that does not match the service's declared layout (counted and dropped)."""


class VmHandle(Protocol):
    """What a service sees of one VM (its session is the daemon's, never the plugin's)."""

    @property
    def name(self) -> str: ...

    @property
    def topology(self) -> GuestTopology | None:
        """The guest's CPUs as its agent last said (None before its Hello)."""
        ...

    @property
    def vcpus(self) -> dict[int, VcpuThread]:
        """The VM's vCPU threads as QEMU last reported them (empty while QMP is down)."""
        ...

    @property
    def protocol_version(self) -> int | None:
        """The protocol version negotiated with the guest's agent (None: not connected)."""
        ...

    def send(self, message: BaseMessage) -> None:
        """Send a message to the guest's agent; raises ChannelError when not connected."""
        ...

    def inject(self, program: SignedProgram) -> None:
        """Send one of the VM's programs to the guest's agent, shown as ``loading`` in
        ``pvctl status`` until the agent's verdict; raises ChannelError when not connected."""
        ...

    def unload_program(self, program_id: str) -> None:
        """Unload one of the VM's programs from the guest, and from ``pvctl status``'s
        ``programs``; raises ChannelError when not connected."""
        ...

    async def read_map(
        self, program_id: str, map_name: str, *, max_entries: int = 1024, timeout: float = 5.0
    ) -> MapContents:
        """One of its program's maps, read by the guest's agent (protocol 3; ChannelError
        from an older agent or a closed channel): resynchronise after lost records."""
        ...

    async def qmp(self, command: str, arguments: Mapping[str, Any] | None = None) -> object:
        """One QMP command to the VM's QEMU, of the few a service may send (``QMP_ALLOWED``:
        the balloon, its statistics and the memory size; :func:`qmp_refusal`); QmpError when
        it fails or the monitor is down, ChannelError for another command or a VM without a
        QMP monitor (libvirt)."""
        ...


@dataclass(frozen=True)
class ServiceContext:
    """What pvhost gives a service when it constructs it."""

    #: The host's program signing key (a program signed with it is trusted by the guests).
    signing_key: Path
    #: A logger of its own: ``pvhost.services.<name>``.
    log: logging.Logger
    #: The host service itself. Only the built-in affinity service (whose placement engine it
    #: is) uses it; a third-party service should need nothing here but the hooks.
    host: Service | None = None

    def sign(
        self, program_id: str, kind: ProgramKind, payload: bytes, *, version: int | None = None
    ) -> SignedProgram:
        """Sign a program for injection (a new version each call: cache the result)."""
        return sign_program(program_id, kind, payload, self.signing_key, version=version)


class ServicePlugin(abc.ABC):
    """One paravirtual service (see the module docstring for how pvhost calls it)."""

    #: The service's name: ``pvctl service enable VM NAME``, ``[services.NAME]``.
    name: ClassVar[str]
    #: One line for ``pvctl service list``.
    summary: ClassVar[str] = ""
    #: The model of its ``[services.NAME]`` config table (None: it takes no settings).
    Config: ClassVar[type[BaseModel] | None] = None
    #: Guest → host message types it consumes besides ring-buffer records.
    messages: ClassVar[tuple[type[BaseMessage], ...]] = ()

    def __init__(self, context: ServiceContext, config: BaseModel | None) -> None:
        self.context = context
        self.config = config

    # -- what it injects, and what its programs write ------------------------------------------
    def programs(self) -> Sequence[SignedProgram]:
        """The programs to inject into every guest it runs in, at every agent Hello.

        Called often (a guest that restarts its agent in a loop): return cached, signed
        programs; sign again only when a payload changes (a new version each signing).
        """
        return ()

    def programs_for(self, vm: VmHandle) -> Sequence[SignedProgram]:
        """The programs for this VM's agent as it is now (``vm.protocol_version`` is known):
        a service whose programs depend on the agent's version overrides this. Default:
        :meth:`programs`. Cache them, as :meth:`programs` does."""
        return self.programs()

    def decode(self, program_id: str, record: bytes) -> object:
        """One ring-buffer record of one of its programs → the event ``on_events`` gets.

        The guest is hostile: raise :class:`EventError` (or any ValueError) for a record that
        does not match the layout; it is counted and dropped. Default: the bytes themselves.
        """
        return record

    # -- hooks ------------------------------------------------------------------------------------
    async def on_ready(self, vm: VmHandle) -> None:  # noqa: B027 - optional hook
        """The guest's agent said Hello (first connection, or it restarted): its programs are
        being injected; resend whatever the guest should know."""

    async def on_topology(self, vm: VmHandle) -> None:  # noqa: B027 - optional hook
        """The guest's online CPUs changed since its agent's Hello (a vCPU hot-plugged and
        brought online, or one taken offline; agents of protocol 5 say so): ``vm.topology`` is
        the new one. Agents of older protocols tell their CPUs at Hello only."""

    async def on_events(  # noqa: B027 - optional hook
        self, vm: VmHandle, program_id: str, events: Sequence[object]
    ) -> None:
        """Decoded records of one of its programs, in order (a batch)."""

    async def on_loaded(self, vm: VmHandle, program_id: str) -> None:  # noqa: B027
        """One of its programs is loaded in the guest (the agent's ``ProgramLoaded`` said so:
        newly loaded, or found already loaded after pvhost restarted). Its maps hold what the
        program saw so far (and what its iterators found at load): read them to resync."""

    def on_records_lost(self, vm: VmHandle, program_id: str, count: int) -> None:  # noqa: B027
        """``count`` records of one of its programs were lost on their way (the guest's agent
        dropped them, or the VM's bounds in pvhost did): resynchronise if that matters.
        Synchronous and called often in a storm: schedule work, do not do it here."""

    async def on_message(self, vm: VmHandle, message: BaseMessage) -> None:  # noqa: B027
        """A guest message of one of the types in :attr:`messages`."""

    async def on_vm_gone(self, vm: str) -> None:  # noqa: B027 - optional hook
        """The VM's QEMU went away: undo what the service did for it on the host."""

    async def on_disable(self, vm: str) -> None:
        """The service was disabled for this VM (operator, or it failed): undo for it.
        Default: the same as :meth:`on_vm_gone`. Its programs are unloaded by pvhost."""
        await self.on_vm_gone(vm)

    async def on_closing(self, vm: VmHandle) -> None:  # noqa: B027 - optional hook
        """pvhost is about to close the VM's session (pvhost stops, or the VM's directory
        went away): QEMU's monitor is still connected (if QEMU lives): undo what needs it.
        :meth:`on_vm_gone` follows."""

    async def reconcile(self, vms: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """pvhost (re)started with these VMs: adopt or undo state a previous run left."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """pvhost stops (after every VM was closed)."""

    # -- what the operator sees -------------------------------------------------------------
    def status(self, vm: str) -> Mapping[str, JsonValue]:
        """This service's state for one VM, as JSON values (shown by ``pvctl status``)."""
        return {}

    def metrics(self) -> Mapping[str, float]:
        """Numbers to export on ``/metrics`` as ``extpv_service_value{service, name}``."""
        return {}
