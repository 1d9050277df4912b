"""Builds the guest agent's Debian package as an operator does (``packaging/build-deb``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["build_deb"]

REPO = Path(__file__).resolve().parent.parent


def build_deb(out: Path) -> Path:
    """Build ``pvagent_*_amd64.deb`` into ``out`` and return its path (the one build-deb prints)."""
    res = subprocess.run(
        [str(REPO / "packaging" / "build-deb"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "EXTPV_PYTHON": sys.executable},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (pkg,) = out.glob("pvagent_*_amd64.deb")
    assert res.stdout.strip() == str(pkg), "build-deb prints the package's path"
    return pkg
