"""The agent's .deb on Debian 13: apt installs it with Debian's own python3-pydantic (2.x).

A minimal trixie tree (mmdebstrap from the Debian archive, like the image recipes) where
``apt-get install ./pvagent_*.deb`` resolves the package's dependencies against the archive;
then the agent's modules import with Debian's pydantic (not the copy carried for Python
3.11), the unit is enabled, and a purge keeps the operator's key. Booting and pinning is
tests/vm/test_6_guest_agent_deb.py (Debian 12); this covers the other dependency branch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

HOOK = r"""set -e
cp "$EXTPV_DEB" "$1/tmp/"
chroot "$1" apt-get install -y -qq "/tmp/$(basename "$EXTPV_DEB")" >/dev/null
r="$1/result"
chroot "$1" /usr/bin/pvagent --help >/dev/null && echo "help ok" >> "$r"
chroot "$1" python3 -c 'import sys; sys.path[0:0] = ["/usr/lib/pvagent/python"]
import pydantic, pvagent.agent, pvagent.cli
print("pydantic", pydantic.VERSION, pydantic.__file__)' >> "$r"
echo "enabled $(chroot "$1" systemctl is-enabled pvagent.service)" >> "$r"
echo "pem" > "$1/etc/pvagent/trusted.d/operator.pem"
chroot "$1" apt-get purge -y -qq pvagent >/dev/null
test -f "$1/etc/pvagent/trusted.d/operator.pem" && echo "key kept" >> "$r"
test ! -e "$1/usr/lib/pvagent" && echo "files gone" >> "$r"
"""


def _mirror() -> str:
    if os.environ.get("EXTPV_MIRROR"):
        return os.environ["EXTPV_MIRROR"]
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+/debian/?)\s*$", sources.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def test_package_installs_on_debian_13_with_debians_pydantic(tmp_path: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is not installed (bash .ci/install-system)")
    build = subprocess.run(
        [str(REPO / "packaging" / "build-deb"), "--out", str(tmp_path / "deb")],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "EXTPV_PYTHON": sys.executable},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    root = tmp_path / "root"
    try:
        res = subprocess.run(
            ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
             "--skip=output/dev", "--aptopt=Apt::Install-Recommends \"false\"",
             "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
             f"--customize-hook={HOOK}", "trixie", str(root), f"deb {_mirror()} trixie main"],
            capture_output=True, text=True, timeout=900, check=False,
            env={**os.environ, "EXTPV_DEB": build.stdout.strip()},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-4000:]
        result = (root / "result").read_text()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert "help ok" in result
    m = re.search(r"^pydantic (\d+)\.\S+ (\S+)$", result, re.MULTILINE)
    assert m, result
    assert m.group(1) == "2" and m.group(2).startswith("/usr/lib/python3/dist-packages/"), result
    assert "enabled enabled" in result
    assert "key kept" in result and "files gone" in result
