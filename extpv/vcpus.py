"""QEMU's vCPU threads: what ``query-cpus-fast`` says, parsed once for every caller.

Per vCPU, QMP's ``query-cpus-fast`` gives the top-level ``thread-id`` (the host tid of the
vCPU thread) and ``props`` (socket/die/core/thread ids in the guest). pvhost reads it over its
own monitor; the VM lab reads it over the launcher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["VcpuThread", "parse_query_cpus_fast", "process_of_thread"]


@dataclass(frozen=True)
class VcpuThread:
    index: int
    tid: int
    socket: int
    die: int
    core: int
    thread: int
    qom_path: str

    @property
    def core_key(self) -> tuple[int, int, int]:
        """Guest vCPUs with the same key are SMT siblings."""
        return (self.socket, self.die, self.core)


def parse_query_cpus_fast(reply: object) -> dict[int, VcpuThread]:
    """vCPU index → :class:`VcpuThread`; ValueError for a reply of another shape."""
    if not isinstance(reply, list):
        raise ValueError(  # noqa: TRY004 - one error type for every malformed reply
            f"query-cpus-fast returned {type(reply).__name__}, expected a list"
        )
    out: dict[int, VcpuThread] = {}
    for item in reply:
        try:
            props: dict[str, Any] = item.get("props", {})
            index = int(item["cpu-index"])
            out[index] = VcpuThread(
                index=index,
                tid=int(item["thread-id"]),
                socket=int(props.get("socket-id", 0)),
                die=int(props.get("die-id", 0)),
                core=int(props.get("core-id", index)),
                thread=int(props.get("thread-id", 0)),
                qom_path=str(item.get("qom-path", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"unexpected query-cpus-fast entry {item!r}: {err}") from err
    return out


def process_of_thread(tid: int) -> int:
    """The process owning thread ``tid`` (its ``Tgid``); ProcessLookupError if it is gone."""
    try:
        text = Path(f"/proc/{tid}/status").read_text()
    except OSError as err:
        raise ProcessLookupError(f"thread {tid} is gone: {err.strerror}") from err
    for line in text.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"/proc/{tid}/status has no Tgid")
