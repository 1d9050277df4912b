"""Host service configuration: ``/etc/extpv/pvhost.toml`` (TOML), validated by pydantic.

Every error names the file and the key, e.g.
``/etc/extpv/pvhost.toml: placement.pool: malformed CPU list '1-x'``.

Example::

    [service]
    runtime_dir = "/run/extpv/vms"
    state_dir = "/run/extpv/state"
    control_socket = "/run/extpv/pvhost.sock"
    metrics = "127.0.0.1:9464"          # "" disables /metrics
    keepalive_interval = 5.0            # Ping a silent guest agent every N s (0: never)
    keepalive_deadline = 15.0           # reset its session after N s without a word
    max_frames_per_s = 2000             # guest agent frames acted on per VM and second
    nice = -10                          # the daemon's CPU priority (0: the default)

    [placement]
    backend = "auto"                    # auto | cgroup2 | cgroup1
    housekeeping = "0"                  # never handed out
    pool = ""                           # "" = every online CPU that is not housekeeping
    policy = "identity"                 # identity | pool | ht-aware (default for every VM)
    quota = 4                           # pinned vCPUs per VM
    rate = 20.0                         # AffinityUpdates applied per second per VM
    burst = 5
    isolate_from = []                   # cgroup v1: cpusets pinned pCPUs are taken from
    cgroup1_mode = "resident"           # cgroup v1: resident or move (docs/cgroup1-resident.md)

    [libvirt]                           # domains libvirt runs (docs/libvirt.md)
    enabled = false
    uri = "qemu:///system"
    [services]                          # paravirtual services (plugins; docs/services.md)
    enabled = ["affinity"]              # what runs in a VM whose own entry does not say
    hook_timeout = 5.0                  # a service hook running longer fails the service
    max_records_per_s = 20000           # guest program records per VM and second
    [services.example]                  # a service's own settings (its Config model)

    [vms.db1]                           # VMs besides those found in runtime_dir
    qmp = "/run/db1/qmp.sock"
    agent = "/run/db1/agent.sock"
    policy = "ht-aware"
    services = ["affinity"]             # this VM's services (default: services.enabled)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extpv.names import VmName
from extpv.tomlconfig import load_toml_model
from pvhost.errors import ConfigError
from pvproto import CpuListError, parse_cpulist

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "LibvirtConfig",
    "PlacementConfig",
    "PolicyName",
    "ServiceConfig",
    "ServicesConfig",
    "VmConfig",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/extpv/pvhost.toml")

PolicyName = Literal["identity", "pool", "ht-aware"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _cpulist(value: str) -> str:
    try:
        parse_cpulist(value)
    except CpuListError as err:
        raise ValueError(str(err)) from None
    return value


class ServiceConfig(_Strict):
    runtime_dir: Path = Path("/run/extpv/vms")
    state_dir: Path = Path("/run/extpv/state")
    control_socket: Path = Path("/run/extpv/pvhost.sock")
    #: ``host:port`` for Prometheus ``/metrics``; empty disables it.
    metrics: str = "127.0.0.1:9464"
    signing_key: Path = Path("/etc/extpv/signing.key")
    #: The affinity program to inject; unset: the agent's compiled ``affinity`` object.
    affinity_program: Path | None = None
    #: Seconds between reconnection attempts grow up to this.
    max_backoff: Annotated[float, Field(gt=0, le=300)] = 10.0
    #: Liveness of a guest agent that said Hello: a Ping every ``keepalive_interval`` s
    #: (0 turns it off); nothing heard for ``keepalive_deadline`` s resets its session (a
    #: SIGSTOPped or hung agent). Pongs come from the agent's event loop, so the deadline
    #: only has to cover a guest that is slow, not one that is busy.
    keepalive_interval: Annotated[float, Field(ge=0, le=3600)] = 5.0
    keepalive_deadline: Annotated[float, Field(gt=0, le=86400)] = 15.0
    #: Frames of one VM's guest agent acted on per second (a second's worth at once): past
    #: it pvhost reads nothing more from that VM's channel until the budget refills, so a
    #: guest that floods blocks on its own writes and costs the host a bounded share of its
    #: event loop. An agent sends records in batches: a few hundred frames a second at most.
    max_frames_per_s: Annotated[float, Field(ge=100, le=1_000_000)] = 2000.0
    #: The daemon's nice value, set at start for all its threads. A guest's pin waits for
    #: pvhost's few milliseconds of work; at the default nice a loaded host (the very load
    #: the pin shields a vCPU from) stretched them to 50-120 ms (bench/results/vm-stages.md).
    #: Also its session's autogroup's value when it leads its session (docs/vm-priority.md).
    nice: Annotated[int, Field(ge=-20, le=19)] = -10

    @model_validator(mode="after")
    def _keepalive(self) -> ServiceConfig:
        if self.keepalive_interval and self.keepalive_deadline <= self.keepalive_interval:
            raise ValueError(
                f"keepalive_deadline ({self.keepalive_deadline:g}) must be longer than "
                f"keepalive_interval ({self.keepalive_interval:g}): a Pong needs a Ping first"
            )
        return self

    @property
    def keepalive(self) -> tuple[float, float] | None:
        """(interval, deadline) for the guest sessions; None when turned off."""
        if not self.keepalive_interval:
            return None
        return (self.keepalive_interval, self.keepalive_deadline)

    @field_validator("metrics")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not host:port")
        return value


class PlacementConfig(_Strict):
    backend: Literal["auto", "cgroup2", "cgroup1"] = "auto"
    #: cgroupfs mount point (the in-VM tests point this elsewhere).
    cgroup_root: Path = Path("/sys/fs/cgroup")
    #: Name of extpv's own cgroup: ``extpv.slice`` (v2) / ``extpv`` (v1) when empty.
    group: str = ""
    housekeeping: str = "0"
    pool: str = ""
    policy: PolicyName = "identity"
    quota: Annotated[int, Field(ge=0, le=8192)] = 4
    rate: Annotated[float, Field(gt=0, le=10_000)] = 20.0
    burst: Annotated[int, Field(ge=1, le=10_000)] = 5
    #: cgroup v1: cpusets (paths in the cpuset hierarchy) a pinned pCPU is taken from while
    #: it is pinned, e.g. where the other VMs and services run. cgroup v2 isolates with
    #: partitions instead.
    isolate_from: Annotated[list[str], Field(max_length=64)] = []
    #: cgroup v1: ``resident`` (the default) moves a vCPU thread once per VM into a cpuset of
    #: its own whose CPUs a pin and an unpin rewrite (no thread move, so no wait for an RCU
    #: grace period on the hot path); ``move`` moves it into its cpuset at every pin and back
    #: at every unpin (libvirt domains are pinned through libvirt in either mode).
    cgroup1_mode: Literal["move", "resident"] = "resident"

    _lists = field_validator("housekeeping", "pool")(_cpulist)

    @field_validator("isolate_from")
    @classmethod
    def _cpuset_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            parts = [p for p in path.split("/") if p]
            if not parts:
                raise ValueError(
                    f"{path!r} is the root cpuset, which cgroup v1 cannot take CPUs from"
                )
            if any(p in (".", "..") for p in parts) or "\0" in path:
                raise ValueError(f"{path!r}: a cpuset path without '.' or '..' parts")
        return ["/" + "/".join(p for p in path.split("/") if p) for path in value]

    def housekeeping_cpus(self) -> frozenset[int]:
        return parse_cpulist(self.housekeeping)

    def pool_cpus(self) -> frozenset[int] | None:
        """The configured pool, or None for "every online CPU that is not housekeeping"."""
        return parse_cpulist(self.pool) if self.pool.strip() else None


ServiceName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]


class ServicesConfig(BaseModel):
    """``[services]``: which paravirtual services run, and each one's own table
    (``[services.NAME]``, validated by the service when pvhost starts)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    enabled: Annotated[list[ServiceName], Field(max_length=64)] = ["affinity"]
    hook_timeout: Annotated[float, Field(gt=0, le=600)] = 5.0
    max_records_per_s: Annotated[float, Field(gt=0, le=10_000_000)] = 20_000.0
    max_queued: Annotated[int, Field(ge=1, le=1_000_000)] = 256

    @model_validator(mode="after")
    def _tables(self) -> ServicesConfig:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(  # noqa: TRY004 - pydantic reports ValueErrors, not TypeErrors
                    f"{key!r}: a service's settings are a table [services.{key}]"
                )
        return self

    def tables(self) -> dict[str, dict[str, object]]:
        """Each service's ``[services.NAME]`` table."""
        return dict(self.model_extra or {})


class VmConfig(_Strict):
    qmp: Path
    agent: Path
    policy: PolicyName | None = None
    quota: Annotated[int, Field(ge=0, le=8192)] | None = None
    #: The services that run in this VM (None: ``[services] enabled``).
    services: Annotated[list[ServiceName], Field(max_length=64)] | None = None


class LibvirtConfig(_Strict):
    """Domains found through libvirt (off by default: the host may have no libvirt)."""

    enabled: bool = False
    uri: Annotated[str, Field(min_length=1, max_length=4096)] = "qemu:///system"
    #: Seconds between reconnection attempts to libvirtd grow up to this.
    max_backoff: Annotated[float, Field(gt=0, le=300)] = 30.0


class Config(_Strict):
    service: ServiceConfig = ServiceConfig()
    placement: PlacementConfig = PlacementConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    services: ServicesConfig = ServicesConfig()
    vms: dict[VmName, VmConfig] = {}


def load_config(path: Path | None) -> Config:
    """Load and validate ``path``; None (or a missing default file) gives the defaults.

    Raises ConfigError naming the file and every bad key.
    """
    return load_toml_model(path, DEFAULT_CONFIG_PATH, Config, ConfigError)
