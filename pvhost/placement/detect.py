"""Choose the placement backend this host supports (shown in ``pvctl status``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pvhost.errors import BackendUnavailable
from pvhost.placement.base import PlacementBackend
from pvhost.placement.cgroup1 import Cgroup1Backend, Cgroup1Mode
from pvhost.placement.cgroup2 import Cgroup2Backend

__all__ = ["detect_backend"]


def detect_backend(
    cgroup_root: Path,
    state_dir: Path,
    prefer: Literal["auto", "cgroup2", "cgroup1"] = "auto",
    group: str = "",
    isolate_from: tuple[str, ...] = (),
    *,
    cgroup1_mode: Cgroup1Mode = "resident",
) -> PlacementBackend:
    """cgroup v2 when the unified hierarchy has cpuset, else the v1 cpuset hierarchy.

    Each backend keeps its own state file, so a host that changes backend between runs
    still undoes what the other one placed (the daemon reconciles both).
    """
    reasons: list[str] = []
    if prefer in ("auto", "cgroup2"):
        try:
            return Cgroup2Backend(cgroup_root, state_dir / "cgroup2.json", group or "extpv.slice")
        except BackendUnavailable as err:
            reasons.append(str(err))
    if prefer in ("auto", "cgroup1"):
        try:
            return Cgroup1Backend(
                cgroup_root / "cpuset",
                state_dir / "cgroup1.json",
                group or "extpv",
                isolate_from,
                cgroup1_mode,
            )
        except BackendUnavailable as err:
            reasons.append(str(err))
    raise BackendUnavailable("no cpuset placement backend here: " + "; ".join(reasons))
