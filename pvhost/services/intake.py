"""Records from a guest → a service's events: decoded by the service, checked, counted.

The guest is hostile: a record that does not match the service's layout (``decode`` raised
ValueError, EventError included) is counted and dropped; any other exception from ``decode``
is the service's own defect and disables it for that VM (the caller's decision).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pvhost.services.base import ServicePlugin

__all__ = ["Decoded", "decode_records"]


@dataclass
class Decoded:
    events: list[object] = field(default_factory=list)
    #: Records that did not match the layout (dropped, reason ``layout``).
    bad: int = 0
    #: Why the service failed while decoding (None: it did not).
    failure: str | None = None


def decode_records(plugin: ServicePlugin, program_id: str, records: Sequence[bytes]) -> Decoded:
    """Each record through ``plugin.decode``, in order; stops at the service's first defect."""
    out = Decoded()
    for record in records:
        try:
            out.events.append(plugin.decode(program_id, record))
        except ValueError:
            out.bad += 1
        except Exception as err:
            out.failure = f"decode raised {type(err).__name__}: {err}"
            break
    return out
