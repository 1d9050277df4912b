"""Agent configuration: ``/etc/pvagent/pvagent.toml`` (TOML), every key optional.

::

    port_name = "org.extpv.agent.0"   # virtio-serial port name (udev attribute `name`)
    trust = "signed"                  # or "any": load unsigned programs — INSECURE
    trusted_dir = "/etc/pvagent/trusted.d"
    allow_attach = ["tracepoint/*", "tp/*", "raw_tracepoint/*", "raw_tp/*", "tp_btf/*", "iter/task"]
    allow_kfuncs = []                 # kfuncs programs may call (shell patterns): none
    allow_pinning = false             # programs may pin maps / use pinned maps
    max_programs = 8                  # programs loaded at once, all ids
    max_program_memory_mib = 64       # kernel memory of all loaded programs and maps
    state_dir = "/var/lib/pvagent"    # newest program version per id (replay guard); "" = off
    bcc_cache_dir = "/var/cache/pvagent"
    documents_dir = "/run/pvagent"    # the host services' documents (placement.json); "" = off
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extpv.tomlconfig import load_toml_model
from pvagent.errors import ConfigError
from pvagent.trust import DEFAULT_ALLOW, DEFAULT_TRUSTED_DIR

__all__ = ["DEFAULT_CONFIG", "DEFAULT_PORT_NAME", "AgentConfig", "load_config"]

DEFAULT_CONFIG = Path("/etc/pvagent/pvagent.toml")
DEFAULT_PORT_NAME = "org.extpv.agent.0"


class AgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    port_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")] = DEFAULT_PORT_NAME
    trust: Literal["signed", "any"] = "signed"
    trusted_dir: Path = DEFAULT_TRUSTED_DIR
    allow_attach: Annotated[
        tuple[Annotated[str, Field(max_length=256)], ...], Field(max_length=64)
    ] = DEFAULT_ALLOW
    allow_kfuncs: Annotated[
        tuple[Annotated[str, Field(max_length=256)], ...], Field(max_length=64)
    ] = ()
    allow_pinning: bool = False
    max_programs: Annotated[int, Field(ge=1, le=1024)] = 8
    max_program_memory_mib: Annotated[float, Field(gt=0, le=1 << 20)] = 64.0
    #: Where the newest accepted version of each program id is kept ("" keeps it in memory).
    state_dir: Path | None = Path("/var/lib/pvagent")
    bcc_cache_dir: Path = Path("/var/cache/pvagent")
    #: Where the host's services publish documents for guest admins and applications, as
    #: ``NAME.json`` (the affinity service's ``placement.json``); "" disables it.
    documents_dir: Path | None = Path("/run/pvagent")
    #: Keys of agents before protocol 4, accepted so an upgraded guest's config still loads;
    #: they do nothing (the host's affinity service coalesces; see ``documents_dir``).
    coalesce_ms: Annotated[float, Field(ge=0, le=10_000)] | None = None
    placement_file: str | None = None

    @field_validator("documents_dir", "state_dir", mode="before")
    @classmethod
    def _empty_disables(cls, value: object) -> object:
        return None if value == "" else value


def load_config(path: Path | None = None) -> AgentConfig:
    """Read ``path`` (default: DEFAULT_CONFIG if it exists, else built-in defaults).

    Raises ConfigError naming the file and every bad key.
    """
    return load_toml_model(path, DEFAULT_CONFIG, AgentConfig, ConfigError)
