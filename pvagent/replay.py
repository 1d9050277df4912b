"""Replay protection: the highest program version accepted under each program id.

A signed ``LoadProgram`` carries a version (the host's signing time, ns) inside the signed
envelope, so it cannot be changed; what a recorded message *can* still do is come back
later. The book refuses a version older than the newest one accepted under the same id;
the same version again is accepted (the host re-sends its current program after every
reconnection).

The book is kept in a small JSON file (``state_dir/versions.json``) so that an agent
restart does not reopen the window; without a file it lives as long as the process.
Entries are created only for programs whose signature verified, so the host alone decides
how many there are; :data:`MAX_ENTRIES` bounds the file anyway (the oldest entries go).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pvagent.errors import TrustRefused

__all__ = ["MAX_ENTRIES", "VersionBook"]

log = logging.getLogger(__name__)

MAX_ENTRIES = 1024


class VersionBook:
    """Highest accepted version per program id, optionally persisted in ``path``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._versions: dict[str, int] = {}
        self._warned = False
        if path is not None:
            self._versions = _read(path)

    def get(self, program_id: str) -> int | None:
        return self._versions.get(program_id)

    def check(self, program_id: str, version: int) -> None:
        """Raise :class:`TrustRefused` if ``version`` is older than the one accepted before."""
        known = self._versions.get(program_id)
        if known is not None and version < known:
            raise TrustRefused(
                f"version {version} of {program_id!r} is older than version {known} loaded "
                "before (a replayed message?)"
            )

    def record(self, program_id: str, version: int) -> None:
        """Remember ``version`` as the newest of ``program_id`` (after :meth:`check`)."""
        if self._versions.get(program_id) == version:
            return
        self._versions.pop(program_id, None)
        self._versions[program_id] = version  # insertion order = age, for the bound below
        while len(self._versions) > MAX_ENTRIES:
            del self._versions[next(iter(self._versions))]
        if self.path is not None:
            self._write(self.path)

    def _write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._versions))
            os.replace(tmp, path)
        except OSError as err:
            if not self._warned:  # once: the book still works in memory
                log.warning("cannot record program versions in %s: %s", path, err)
                self._warned = True


def _read(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable program version record %s: %s", path, err)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring program version record %s: not a JSON object", path)
        return {}
    return {
        str(k): v
        for k, v in list(data.items())[-MAX_ENTRIES:]
        if isinstance(v, int) and not isinstance(v, bool)
    }
