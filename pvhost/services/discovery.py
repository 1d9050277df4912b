"""Finding services: the entry-point group ``extpv.services``, plus the built-in ones.

A third party ships a service as its own distribution declaring, e.g. in its
``pyproject.toml``::

    [project.entry-points."extpv.services"]
    memory = "extpv_memory:MemoryService"

Every entry point is loaded in isolation: one that fails to import, or names something that is
not a :class:`~pvhost.services.base.ServicePlugin`, is listed with its error and never breaks
the others. The built-in services are always there (also from a source checkout whose
installed metadata predates them); an entry point of the same name and class is the same.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pvhost.services.base import ServicePlugin

__all__ = ["ENTRY_POINT_GROUP", "Found", "discover"]

ENTRY_POINT_GROUP = "extpv.services"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Found:
    """One service found: its class, or why it cannot be used."""

    name: str
    #: Where it came from: ``built-in`` or ``DIST VERSION (module:attr)``.
    origin: str
    plugin: type[ServicePlugin] | None = None
    error: str = ""
    #: Other entry points of the same name, ignored (the first one found wins).
    shadowed: tuple[str, ...] = ()


def _builtin() -> list[type[ServicePlugin]]:
    from pvhost.services.affinity import AffinityService  # noqa: PLC0415 - avoids a cycle
    from pvhost.services.memory import MemoryService  # noqa: PLC0415 - avoids a cycle

    return [AffinityService, MemoryService]


def _load(ep: importlib.metadata.EntryPoint) -> Found:
    dist = ep.dist
    origin = f"{dist.name} {dist.version} ({ep.value})" if dist is not None else ep.value
    try:
        obj = ep.load()
    except Exception as err:  # a third party's import error: listed, never fatal
        return Found(ep.name, origin, error=f"cannot load {ep.value}: {type(err).__name__}: {err}")
    if not (isinstance(obj, type) and issubclass(obj, ServicePlugin)):
        return Found(ep.name, origin, error=f"{ep.value} is not a ServicePlugin subclass")
    if getattr(obj, "name", None) != ep.name:
        return Found(
            ep.name,
            origin,
            error=f"{ep.value} calls itself {getattr(obj, 'name', None)!r}, not {ep.name!r}",
        )
    return Found(ep.name, origin, plugin=obj)


def discover(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> dict[str, Found]:
    """Every service by name: built-ins, then the ``extpv.services`` entry points."""
    found = {cls.name: Found(cls.name, "built-in", plugin=cls) for cls in _builtin()}
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(entry_points, key=lambda e: e.name):
        if not _NAME.match(ep.name):
            found.setdefault(ep.name, Found(ep.name, ep.value, error="not a valid service name"))
            continue
        candidate = _load(ep)
        known = found.get(ep.name)
        if known is None or (known.plugin is None and candidate.plugin is not None):
            found[ep.name] = candidate
        elif candidate.plugin is not known.plugin:
            # A second service of that name (never replaces a built-in): shown, not used.
            found[ep.name] = dataclasses.replace(
                known, shadowed=(*known.shadowed, candidate.origin)
            )
    return found
