"""Saved previous state, for exact undo and crash recovery.

Before a backend changes anything it records here what it is about to change and the value it
replaces; the file is replaced atomically (write, fsync, rename), so a kill -9 at any moment
leaves either the old or the new record, and a record is written *before* the change it
describes and cleared only *after* that change is undone. At start, reconcile reads it back
together with cgroupfs.

The file (one per backend: ``cgroup1.json``, ``cgroup2.json`` in the state directory)::

    {"version": 1,
     "vms": {"<vm>": {"attach": {"pid": …, "prev_cgroup": "/…"} | null,       (cgroup v2 only)
                      "homes": {"<n>": {"tid": …, "prev_cpuset": "/…", "prev_affinity": […],
                                        "prev_effective": […]}},   (cgroup v1 resident only)
                      "vcpus": {"<n>": {"tid": …, "pcpu": …, "prev_affinity": […],
                                        "prev_effective": […], <backend's own fields>}}}},
     "withheld": {"/<cpuset>": "<its cpus before>"}}                 (cgroup v1 isolate_from)

A file that cannot be read, does not validate or has another version is never trusted, deleted
or overwritten: it is logged at ERROR, renamed to ``<name>.unreadable-<UTC time>`` next to
itself, and the store starts empty (:attr:`StateStore.kept_aside` names the copy); the backend
then finds its cgroups with no record in cgroupfs and hands their threads back.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from pvhost.errors import PlacementError
from pvhost.files import replace_file

__all__ = [
    "STATE_VERSION",
    "AttachRecord",
    "Cgroup1Home",
    "Cgroup1Pin",
    "Cgroup2Pin",
    "PinRecord",
    "StateFile",
    "StateStore",
    "VmRecord",
]

_log = logging.getLogger(__name__)

#: The version this pvhost writes and the only one it reads.
STATE_VERSION: Final = 1


class PinRecord(BaseModel):
    """One pinned vCPU thread and what it had before (shared by both backends)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tid: PositiveInt
    pcpu: NonNegativeInt
    #: The thread's affinity before the pin (its own choice, within its cpuset of then).
    prev_affinity: tuple[NonNegativeInt, ...]
    #: The effective CPUs of its cpuset before the pin (what could hide part of its own mask).
    prev_effective: tuple[NonNegativeInt, ...]

    @model_validator(mode="before")
    @classmethod
    def _effective_defaults_to_affinity(cls, data: Any) -> Any:
        # Records written before prev_effective existed: the affinity is the best lower bound.
        if isinstance(data, dict) and "prev_effective" not in data and "prev_affinity" in data:
            return {**data, "prev_effective": data["prev_affinity"]}
        return data


class Cgroup1Pin(PinRecord):
    #: The v1 cpuset the thread was in (``/proc/<tid>/cpuset``, relative to the hierarchy).
    prev_cpuset: str


class Cgroup2Pin(PinRecord):
    #: The vCPU cgroup's ``cpuset.cpus`` before the pin ("" = inherited from the parent).
    prev_cpus: str


class AttachRecord(BaseModel):
    """A VM whose QEMU process was moved into extpv's cgroups (cgroup v2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: PositiveInt
    #: The unified-hierarchy cgroup QEMU came from; it goes back there at detach.
    prev_cgroup: str


class Cgroup1Home(BaseModel):
    """A vCPU thread the cgroup v1 backend moved, once, into a cpuset of its own (``resident``
    mode), and what it had before: it goes back there when the VM is detached."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tid: PositiveInt
    #: The v1 cpuset the thread was in (``/proc/<tid>/cpuset``, relative to the hierarchy).
    prev_cpuset: str
    prev_affinity: tuple[NonNegativeInt, ...]
    prev_effective: tuple[NonNegativeInt, ...]


PinT = TypeVar("PinT", bound=PinRecord)
# Covariant for the store: one base class holds either backend's store as StateStore[PinRecord].
PinT_co = TypeVar("PinT_co", bound=PinRecord, covariant=True)


class VmRecord(BaseModel, Generic[PinT]):
    model_config = ConfigDict(extra="forbid")

    attach: AttachRecord | None = None
    vcpus: dict[NonNegativeInt, PinT] = Field(default_factory=dict)
    #: cgroup v1 ``resident`` mode: vCPU → the thread moved into its own cpuset.
    homes: dict[NonNegativeInt, Cgroup1Home] = Field(default_factory=dict)


class StateFile(BaseModel, Generic[PinT]):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = STATE_VERSION
    vms: dict[str, VmRecord[PinT]] = Field(default_factory=dict)
    #: Other cpusets pinned pCPUs are taken from (cgroup v1 ``isolate_from``): cgroup path →
    #: its ``cpuset.cpus`` before extpv first took a CPU from it, given back exactly.
    withheld: dict[str, str] = Field(default_factory=dict)


class StateStore(Generic[PinT_co]):
    """The records of one backend, saved to ``path`` before every change.

    ``model`` is the backend's parametrised file model (``StateFile[Cgroup1Pin]``). Reads hand
    out copies, so callers may change the store while iterating what they read.
    """

    def __init__(self, path: Path, model: type[StateFile[PinT_co]]) -> None:
        self.path = path
        self._model = model
        self._pin_model: type[PinT_co] = model.__pydantic_generic_metadata__["args"][0]
        #: Where an unreadable file found at start was moved; None when there was none.
        self.kept_aside: Path | None = None
        self._file: StateFile[PinT_co] = self._load()

    # -- reading -----------------------------------------------------------------------------
    def vms(self) -> list[str]:
        """Every VM with a record (attached, pinned, or both)."""
        return list(self._file.vms)

    def pins(self) -> dict[str, dict[int, int]]:
        """VM → {vCPU → pCPU} for every saved pin."""
        return {
            vm: {vcpu: rec.pcpu for vcpu, rec in entry.vcpus.items()}
            for vm, entry in self._file.vms.items()
            if entry.vcpus
        }

    def pin_records(self, vm: str) -> dict[int, PinT_co]:
        entry = self._file.vms.get(vm)
        return dict(entry.vcpus) if entry is not None else {}

    def pin(self, vm: str, vcpu: int) -> PinT_co | None:
        entry = self._file.vms.get(vm)
        return entry.vcpus.get(vcpu) if entry is not None else None

    def homes(self, vm: str) -> dict[int, Cgroup1Home]:
        """vCPU → its thread's home (cgroup v1 ``resident`` mode)."""
        entry = self._file.vms.get(vm)
        return dict(entry.homes) if entry is not None else {}

    def attach(self, vm: str) -> AttachRecord | None:
        entry = self._file.vms.get(vm)
        return entry.attach if entry is not None else None

    def withheld(self) -> dict[str, str]:
        """Cpuset path → its CPUs before extpv took pinned pCPUs from it."""
        return dict(self._file.withheld)

    # -- changing (each saves before returning) -------------------------------------------------
    def set_pin(self, vm: str, vcpu: int, record: PinRecord | None) -> None:
        entry = self._entry(vm)
        if record is None:
            entry.vcpus.pop(vcpu, None)
        else:
            # Typed as the base class so one backend base can hold either store; checked here.
            if not isinstance(record, self._pin_model):
                raise TypeError(
                    f"{self.path}: a {type(record).__name__} in a {self._pin_model.__name__} store"
                )
            entry.vcpus[vcpu] = record
        self._drop_if_empty(vm)
        self.save()

    def set_attach(self, vm: str, record: AttachRecord | None) -> None:
        self._entry(vm).attach = record
        self._drop_if_empty(vm)
        self.save()

    def set_home(self, vm: str, vcpu: int, record: Cgroup1Home | None) -> None:
        entry = self._entry(vm)
        if record is None:
            entry.homes.pop(vcpu, None)
        else:
            entry.homes[vcpu] = record
        self._drop_if_empty(vm)
        self.save()

    def set_withheld(self, withheld: dict[str, str]) -> None:
        self._file.withheld = dict(withheld)
        self.save()

    def drop_vm(self, vm: str) -> None:
        self._file.vms.pop(vm, None)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_file(self.path, self._file.model_dump_json().encode())

    # -- internals -------------------------------------------------------------------------------
    def _entry(self, vm: str) -> VmRecord[PinT_co]:
        return self._file.vms.setdefault(vm, VmRecord())

    def _drop_if_empty(self, vm: str) -> None:
        entry = self._file.vms.get(vm)
        if entry is not None and entry.attach is None and not entry.vcpus and not entry.homes:
            del self._file.vms[vm]

    def _load(self) -> StateFile[PinT_co]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return self._model()
        except OSError as err:
            return self._keep_aside(f"cannot read it: {err.strerror}")
        try:
            data = json.loads(text)
        except ValueError as err:
            return self._keep_aside(f"not JSON ({err})")
        if isinstance(data, dict) and "version" not in data and "vms" in data:
            # Written before the file had a version: the layout is version 1's.
            data = {**data, "version": STATE_VERSION}
        version = data.get("version") if isinstance(data, dict) else None
        if version != STATE_VERSION:
            return self._keep_aside(
                f"version {version!r}, and this pvhost reads version {STATE_VERSION} only"
            )
        try:
            return self._model.model_validate(data)
        except ValidationError as err:
            return self._keep_aside(f"invalid: {_first_errors(err)}")

    def _keep_aside(self, reason: str) -> StateFile[PinT_co]:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for n in range(1000):
            aside = self.path.with_name(
                f"{self.path.name}.unreadable-{stamp}" + (f".{n}" if n else "")
            )
            try:
                # link + unlink, not rename: a rename would replace an earlier copy.
                os.link(self.path, aside)
            except FileExistsError:
                continue
            except OSError as err:
                raise PlacementError(
                    f"state file {self.path} is unusable ({reason}) and cannot be kept aside "
                    f"as {aside}: {err.strerror}; move it away by hand, then start pvhost again"
                ) from err
            self.path.unlink()
            break
        else:
            raise PlacementError(f"too many unreadable copies of {self.path}: clean them up")
        self.kept_aside = aside
        _log.error(
            "state file %s is unusable (%s): kept aside as %s; its undo records are lost, so "
            "extpv's cgroups are reconciled from cgroupfs instead (their threads handed back)",
            self.path,
            reason,
            aside,
        )
        return self._model()


def _first_errors(err: ValidationError, most: int = 3) -> str:
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors()[:most]
    ]
    more = err.error_count() - most
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
