"""The pseudo file systems eBPF tracing needs, mounted if the system has not done it.

systemd mounts tracefs on demand; a guest without systemd, or a container, may not have it,
and libbpf then cannot resolve tracepoint ids. Mount points already present are left alone.
"""

from __future__ import annotations

import os
import subprocess

from pvagent.errors import AgentError

__all__ = ["ensure_tracing_mounts"]

_MOUNTS = (("tracefs", "nodev", "/sys/kernel/tracing", "/sys/kernel/tracing/events"),)


def ensure_tracing_mounts() -> None:
    """Mount tracefs at /sys/kernel/tracing unless its events are already visible."""
    for fstype, source, target, probe in _MOUNTS:
        if os.path.isdir(probe) or os.path.isdir("/sys/kernel/debug/tracing/events"):
            continue
        result = subprocess.run(
            ["mount", "-t", fstype, source, target], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise AgentError(
                f"tracefs is not mounted and mounting it at {target} failed: "
                f"{result.stderr.strip() or result.returncode}; "
                f"hint: mount -t {fstype} {source} {target}"
            )
