"""A tmpfs for pvhost's state directory during a bench, as on a real host.

pvhost's default ``state_dir`` is ``/run/extpv/state`` and ``/run`` is a tmpfs on the hosts
extpv targets (systemd mounts it; the container/appliance uses ``/run`` too), so saving the
state record (write, fsync, rename: :meth:`pvhost.state.StateFile.save`) costs no disk
flush there. A bench host need not have a tmpfs ``/run`` (this CI host's ``/run`` is on the
shared ext4 disk, where the fsync alone stalls 10-20 ms under other sessions' I/O), so the
benches mount a small private tmpfs on the daemon's state directory and unmount it after.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["state_tmpfs"]


@contextmanager
def state_tmpfs(path: Path) -> Iterator[Path]:
    """Mount a fresh tmpfs (4 MiB, mode 0700) on ``path`` for the duration; unmount after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "extpv-bench-state", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
