"""Running the services: which run in which VM, and every call into a plugin, guarded.

A plugin is third-party code in the daemon: every hook call goes through this module, which
gives it a deadline, checks what it returns, and on any failure (an exception, a deadline
missed, a value of the wrong type) logs it once, marks the service ``failed`` for that VM,
unloads its programs from that guest and calls its ``on_disable``; the other services and the
other VMs are not touched. One VM's calls into one service run in order in a task of their
own, so a slow service delays neither the VM's channel nor another service.

What a guest sends to a service is bounded per VM: records per second (``[services]
max_records_per_s``), queued calls per service (``max_queued``); what exceeds them, records
that do not match the service's layout and records of programs no service owns are counted
(``extpv_service_dropped_total{reason}``) and dropped.

The parts: :mod:`pvhost.services.guard` (a guarded call, the per-VM-per-service runner),
:mod:`pvhost.services.intake` (records decoded and checked), :mod:`pvhost.services.vmstate`
(per-VM bookkeeping); this module decides what runs where and when each hook is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from pvhost.errors import ChannelError, ConfigError, HostError
from pvhost.metrics import Metrics
from pvhost.programs import SignedProgram
from pvhost.services.base import ServiceContext, ServicePlugin, VmHandle
from pvhost.services.discovery import Found
from pvhost.services.guard import MAX_REASON, Call, Runner, guarded
from pvhost.services.intake import decode_records
from pvhost.services.vmstate import VmState
from pvproto import BaseMessage
from pvproto.ratelimit import TokenBucket

__all__ = ["ServiceManager", "ServicesSettings"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServicesSettings:
    """``[services]`` of ``pvhost.toml`` as the manager needs it."""

    #: Services that run in a VM unless its own config says otherwise.
    default: tuple[str, ...] = ("affinity",)
    #: Per-VM choice from ``[vms.NAME] services`` (None: the default).
    per_vm: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Each service's ``[services.NAME]`` table (validated by its ``Config``).
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    hook_timeout: float = 5.0
    max_records_per_s: float = 20_000.0
    max_queued: int = 256


class ServiceManager:
    """The services of this daemon and their state in each VM (see the module docstring)."""

    def __init__(
        self,
        found: Mapping[str, Found],
        settings: ServicesSettings,
        context: Callable[[str], ServiceContext],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.found = dict(found)
        #: Services that can run, by name.
        self.plugins: dict[str, ServicePlugin] = {}
        #: Services that cannot (not installed, failed to load or to start), and why.
        self.unusable: dict[str, str] = {}
        #: Built-in services: extpv's own code, whose hooks get no deadline (the affinity
        #: service's undo waits for the placement lock, and must never be cut short).
        self._builtin = {name for name, item in self.found.items() if item.origin == "built-in"}
        for name, item in sorted(self.found.items()):
            if item.plugin is None:
                self.unusable[name] = item.error
                continue
            try:
                config = self._config(item.plugin, settings.tables.get(name, {}))
                self.plugins[name] = item.plugin(context(name), config)
            except ConfigError:
                raise
            except Exception as err:  # its constructor is its own code
                self.unusable[name] = f"failed to start: {type(err).__name__}: {err}"[:MAX_REASON]
        for name in settings.tables:
            if name not in self.found:
                raise ConfigError(f"[services.{name}]: no service named {name!r} is installed")
        for name in {*settings.default, *(s for v in settings.per_vm.values() for s in v)}:
            if name not in self.plugins and name not in self.unusable:
                self.unusable[name] = "not installed (no extpv.services entry point)"
        for name, why in sorted(self.unusable.items()):
            _log.error("service %s cannot run: %s", name, why)
        self._vms: dict[str, VmState] = {}
        #: Disables under way (a failed service being stopped), awaited at close.
        self._background: set[asyncio.Task[None]] = set()
        metrics.add_service_collector(self._collect)

    @staticmethod
    def _config(plugin: type[ServicePlugin], table: Mapping[str, Any]) -> BaseModel | None:
        model = plugin.Config
        if model is None:
            if table:
                raise ConfigError(f"[services.{plugin.name}]: the service takes no settings")
            return None
        try:
            return model.model_validate(dict(table))
        except ValidationError as err:
            lines = [
                f"services.{plugin.name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in err.errors()
            ]
            raise ConfigError("; ".join(lines)) from err

    # -- guarded calls -----------------------------------------------------------------------
    async def guarded(self, service: str, hook: str, call: Call) -> str | None:
        """Run one hook call (:func:`pvhost.services.guard.guarded`; built-in services get no
        deadline); None when it went well, else why it failed."""
        timeout = None if service in self._builtin else self.settings.hook_timeout
        return await guarded(service, hook, call, timeout)

    def _sync(self, vm: str, service: str, hook: str, call: Callable[[], Any]) -> Any:
        """A synchronous hook; on an exception the service fails for ``vm`` (None returned)."""
        try:
            return call()
        except Exception as err:
            self.fail(vm, service, f"{hook} raised {type(err).__name__}: {err}")
            return None

    def fail(self, vm: str, service: str, reason: str) -> None:
        """Disable ``service`` for ``vm`` because it misbehaved (logged once)."""
        state = self._vms.get(vm)
        if state is None or state.states.get(service) != "enabled":
            return
        reason = reason[:MAX_REASON]
        _log.error("%s: service %s failed and is disabled for this VM: %s", vm, service, reason)
        self.metrics.service_failures.labels(service=service).inc()
        state.states[service] = f"failed: {reason}"
        task = asyncio.get_running_loop().create_task(
            self._stop_in(vm, state, service), name=f"service-stop-{service}-{vm}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_in(self, vm: str, state: VmState, service: str) -> None:
        """Unload the service's programs from the guest, stop its calls, let it undo."""
        runner = state.runners.pop(service, None)
        if runner is not None and runner.task is not asyncio.current_task():
            runner.task.cancel()
        for program_id in [p for p, s in state.owners.items() if s == service]:
            del state.owners[program_id]
            with contextlib.suppress(ChannelError):  # not connected: no Hello injects it now
                state.handle.unload_program(program_id)  # also out of `pvctl status`
        plugin = self.plugins[service]
        reason = await self.guarded(service, "on_disable", lambda: plugin.on_disable(vm))
        if reason is not None:
            _log.error("%s: service %s: %s", vm, service, reason[:MAX_REASON])

    def _runner(self, vm: str, state: VmState, service: str) -> Runner:
        runner = state.runners.get(service)
        if runner is None:
            runner = state.runners[service] = Runner(
                f"service-{service}-{vm}",
                self.settings.max_queued,
                functools.partial(self.guarded, service),
                functools.partial(self.fail, vm, service),
            )
        return runner

    def _submit(self, vm: str, service: str, hook: str, call: Call) -> bool:
        state = self._vms.get(vm)
        if state is None or state.states.get(service) != "enabled":
            return False
        if not self._runner(vm, state, service).submit(hook, call):
            self._drop(state, vm, "backlog")
            return False
        return True

    def _lost(self, state: VmState, vm: str, service: str, program_id: str, count: int) -> None:
        """Tell ``service`` that records of its program were lost (it may resynchronise)."""
        if count <= 0 or state.states.get(service) != "enabled":
            return
        plugin = self.plugins[service]
        self._sync(vm, service, "on_records_lost",
                   lambda: plugin.on_records_lost(state.handle, program_id, count))  # fmt: skip

    def _drop(self, state: VmState, vm: str, reason: str, count: int = 1) -> None:
        state.drop(self.metrics, reason, count)

    # -- VMs ----------------------------------------------------------------------------------
    def wanted(self, vm: str) -> tuple[str, ...]:
        return self.settings.per_vm.get(vm, self.settings.default)

    def add_vm(self, handle: VmHandle) -> None:
        wanted = self.wanted(handle.name)
        states = {name: ("enabled" if name in wanted else "disabled") for name in self.plugins}
        bucket = TokenBucket(
            self.settings.max_records_per_s, max(1, int(self.settings.max_records_per_s))
        )
        self._vms[handle.name] = VmState(handle, states, bucket=bucket)

    async def remove_vm(self, vm: str) -> None:
        state = self._vms.pop(vm, None)
        if state is None:
            return
        for runner in state.runners.values():
            runner.task.cancel()
        await asyncio.gather(*(r.task for r in state.runners.values()), return_exceptions=True)

    def enabled(self, vm: str, service: str) -> bool:
        state = self._vms.get(vm)
        return state is not None and state.states.get(service) == "enabled"

    def programs(self, vm: str) -> list[SignedProgram]:
        """What the enabled services of ``vm`` inject (called at every agent Hello)."""
        state = self._vms.get(vm)
        if state is None:
            return []
        out: list[SignedProgram] = []
        for service, plugin in self.plugins.items():
            if state.states[service] != "enabled":
                continue
            programs = self._sync(
                vm, service, "programs", functools.partial(plugin.programs_for, state.handle)
            )
            if programs is None:
                continue
            if not isinstance(programs, Sequence) or not all(
                isinstance(p, SignedProgram) for p in programs
            ):
                self.fail(vm, service, f"programs returned {type(programs).__name__}, not a "
                          "sequence of SignedProgram")  # fmt: skip
                continue
            taken = [
                p.program_id for p in programs if state.owners.get(p.program_id, service) != service
            ]
            if taken:
                self.fail(vm, service, f"program id {taken[0]!r} is another service's")
                continue
            for program in programs:
                state.owners[program.program_id] = service
            out.extend(programs)
        return out

    def ready(self, vm: str) -> None:
        """The guest's agent said Hello: each enabled service's ``on_ready``."""
        state = self._vms.get(vm)
        if state is None:
            return
        for service, plugin in self.plugins.items():
            self._submit(vm, service, "on_ready", functools.partial(plugin.on_ready, state.handle))

    def topology_changed(self, vm: str) -> None:
        """The guest's online CPUs changed since its Hello (``vm.topology`` is the new one):
        each enabled service's ``on_topology``."""
        state = self._vms.get(vm)
        if state is None:
            return
        for service, plugin in self.plugins.items():
            self._submit(
                vm, service, "on_topology", functools.partial(plugin.on_topology, state.handle)
            )

    def records(self, vm: str, program_id: str, records: Sequence[bytes]) -> None:
        """Ring-buffer records of ``program_id`` from ``vm``'s agent → its service, decoded."""
        state = self._vms.get(vm)
        if state is None or not records:
            return
        service = state.owners.get(program_id)
        if service is None or state.states.get(service) != "enabled":
            self._drop(state, vm, "unclaimed", len(records))
            return
        if not state.bucket.try_take(len(records)):
            self._drop(state, vm, "rate", len(records))
            self._lost(state, vm, service, program_id, len(records))
            return
        state.records += len(records)
        self.metrics.service_records.labels(vm=vm, service=service).inc(len(records))
        plugin = self.plugins[service]
        decoded = decode_records(plugin, program_id, records)
        if decoded.failure is not None:
            self.fail(vm, service, decoded.failure)
            return
        events = decoded.events
        if decoded.bad:
            self._drop(state, vm, "layout", decoded.bad)
        if events and not self._submit(
            vm, service, "on_events",
            lambda: plugin.on_events(state.handle, program_id, events),
        ):  # fmt: skip
            self._lost(state, vm, service, program_id, len(events))

    def bad_records(self, vm: str, count: int = 1) -> None:
        """Records that are not even a record (a malformed ``ProgramEvent``): counted, dropped."""
        state = self._vms.get(vm)
        if state is not None:
            self._drop(state, vm, "layout", count)

    def lost_records(self, vm: str, count: int, program_id: str | None = None) -> None:
        """Records the guest's agent says it dropped (it had no host, or the host lagged)."""
        state = self._vms.get(vm)
        if state is not None:
            self._drop(state, vm, "guest-lost", count)
            service = state.owners.get(program_id) if program_id is not None else None
            if service is not None and program_id is not None:
                self._lost(state, vm, service, program_id, count)

    def loaded(self, vm: str, program_id: str) -> None:
        """The guest's agent loaded ``program_id`` (or had it loaded): its service's
        ``on_loaded``, in order with its records."""
        state = self._vms.get(vm)
        service = state.owners.get(program_id) if state is not None else None
        if state is None or service is None:
            return
        plugin = self.plugins[service]
        self._submit(vm, service, "on_loaded",
                     functools.partial(plugin.on_loaded, state.handle, program_id))  # fmt: skip

    def message(self, vm: str, message: BaseMessage) -> bool:
        """A guest message for an enabled service of ``vm``; False when none takes it."""
        state = self._vms.get(vm)
        if state is None:
            return False
        for service, plugin in self.plugins.items():
            if isinstance(message, plugin.messages) and state.states[service] == "enabled":
                self._submit(
                    vm,
                    service,
                    "on_message",
                    functools.partial(plugin.on_message, state.handle, message),
                )
                return True
        return False

    async def closing(self, vm: str) -> None:
        """pvhost is about to close the VM's session (monitor still up): ``on_closing``."""
        await self._each_enabled(
            vm, "on_closing", lambda plugin, handle: functools.partial(plugin.on_closing, handle)
        )

    async def vm_gone(self, vm: str) -> None:
        """The VM's QEMU went away: each enabled service undoes what it did for it."""
        await self._each_enabled(
            vm, "on_vm_gone", lambda plugin, _handle: functools.partial(plugin.on_vm_gone, vm)
        )

    async def _each_enabled(
        self, vm: str, hook: str, call: Callable[[ServicePlugin, VmHandle], Call]
    ) -> None:
        """Run ``hook`` of every service enabled in ``vm``, one after the other, guarded; a
        service whose hook fails is disabled for the VM (the others still run theirs)."""
        state = self._vms.get(vm)
        if state is None:
            return
        for service, plugin in self.plugins.items():
            if state.states[service] == "enabled":
                reason = await self.guarded(service, hook, call(plugin, state.handle))
                if reason is not None:
                    self.fail(vm, service, reason)

    # -- operator -------------------------------------------------------------------------------
    def _known(self, vm: str, service: str) -> VmState:
        state = self._vms.get(vm)
        if state is None:
            raise HostError(f"no VM named {vm!r} (known: {', '.join(sorted(self._vms)) or 'none'})")
        if service not in self.plugins:
            why = self.unusable.get(service)
            known = ", ".join(sorted(self.plugins)) or "none"
            raise HostError(
                f"service {service!r} cannot run: {why}" if why else
                f"no service named {service!r} (installed: {known})"
            )  # fmt: skip
        return state

    async def enable(self, vm: str, service: str) -> dict[str, Any]:
        """Run ``service`` in ``vm`` from now on (also after it failed): inject its programs now
        when the agent is connected (else at its next Hello)."""
        state = self._known(vm, service)
        previous = state.states[service]
        state.states[service] = "enabled"
        if previous != "enabled" and state.handle.protocol_version is not None:
            for program in self._programs_of(vm, service):
                with contextlib.suppress(ChannelError):
                    state.handle.inject(program)
            plugin = self.plugins[service]
            self._submit(vm, service, "on_ready", lambda: plugin.on_ready(state.handle))
        return {"vm": vm, "service": service, "state": "enabled", "was": previous}

    def _programs_of(self, vm: str, service: str) -> list[SignedProgram]:
        return [p for p in self.programs(vm) if self._vms[vm].owners.get(p.program_id) == service]

    async def disable(self, vm: str, service: str) -> dict[str, Any]:
        """Stop ``service`` in ``vm``: unload its programs and let it undo what it did."""
        state = self._known(vm, service)
        previous = state.states[service]
        state.states[service] = "disabled"
        if previous == "enabled":
            await self._stop_in(vm, state, service)
        return {"vm": vm, "service": service, "state": "disabled", "was": previous}

    def describe(self, vm: str) -> dict[str, Any]:
        """Per service: its state in ``vm`` and its own status (``pvctl status``)."""
        state = self._vms.get(vm)
        if state is None:
            return {}
        out: dict[str, Any] = {}
        for service, plugin in self.plugins.items():
            entry: dict[str, Any] = {}
            if state.states[service] == "enabled":
                status = self._sync(vm, service, "status", functools.partial(plugin.status, vm))
                if status is not None and not _is_json_object(status):
                    self.fail(vm, service, f"status returned {type(status).__name__}, not a "
                              "JSON object")  # fmt: skip
                    status = None
                if status is not None:
                    entry["status"] = dict(status)
            out[service] = {"state": state.states[service], **entry}
        if state.dropped:
            out["_dropped"] = dict(state.dropped)
        return out

    def catalogue(self) -> dict[str, Any]:
        """``pvctl service list``: every service found, and where each runs."""
        services = {}
        for name in sorted({*self.found, *self.unusable}):
            item = self.found.get(name)
            services[name] = {
                "origin": item.origin if item else "",
                "summary": getattr(item.plugin, "summary", "") if item and item.plugin else "",
                "usable": name in self.plugins,
                "error": self.unusable.get(name, ""),
                "default": name in self.settings.default,
                "shadowed": list(item.shadowed) if item else [],
            }
        vms = {vm: dict(state.states) for vm, state in sorted(self._vms.items())}
        return {"services": services, "vms": vms}

    async def reconcile(self, vms: Iterable[str]) -> None:
        names = sorted(vms)
        for service, plugin in self.plugins.items():
            reason = await self.guarded(
                service, "reconcile", functools.partial(plugin.reconcile, names)
            )
            if reason is not None:
                _log.error("service %s: %s", service, reason)

    async def close(self) -> None:
        for vm in list(self._vms):
            await self.remove_vm(vm)
        await asyncio.gather(*self._background, return_exceptions=True)
        for service, plugin in self.plugins.items():
            reason = await self.guarded(service, "close", plugin.close)
            if reason is not None:
                _log.error("service %s: %s", service, reason)

    def _collect(self) -> Iterable[tuple[str, str, float]]:
        """(service, name, value) of every service's ``metrics()``; a broken one is skipped."""
        for service, plugin in self.plugins.items():
            try:
                values = plugin.metrics()
                items = [(str(k), float(v)) for k, v in values.items()]
            except Exception as err:  # its metrics are its own; /metrics stays up
                _log.debug("service %s: metrics failed: %s", service, err)
                continue
            for name, value in items:
                if math.isfinite(value):
                    yield service, name, value


def _is_json_object(value: object) -> bool:
    if not isinstance(value, Mapping):
        return False
    try:
        json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
