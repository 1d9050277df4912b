"""Summarise guest image builds (their manifest.json) into bench/results/image.md.

sudo images/build-image --variant small --out images/out/fig
sudo images/build-image --variant full --out images/out/fig
.venv/bin/python bench/image_report.py images/out/fig/small images/out/fig/full ...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main(dirs: list[str]) -> int:
    rows = []
    for d in dirs:
        m = json.loads((Path(d) / "manifest.json").read_text())
        f = m["files"]
        name = m["variant"] + (" --with-tests" if m.get("with_tests") else "")
        rows.append(
            f"| {name} | {m['suite']} | {m['kernel']} | {m['build_seconds']} | "
            f"{m['rootfs_used_mib']} | {mib(f['rootfs.img']['bytes'])} | "
            f"{mib(f['rootfs.img']['allocated_bytes'])} | {mib(f['initrd.img']['bytes'])} | "
            f"{mib(f['vmlinuz']['bytes'])} | {m['installed_package_count']} |"
        )
    out = REPO / "bench" / "results" / "image.md"
    out.write_text(
        "\n".join(
            [
                f"# Guest image builds ({time.strftime('%Y-%m-%d', time.gmtime())})",
                "",
                "`images/build-image` on this kind of machine (Debian 12, 2 cores, Debian archive "
                "over the network, no apt cache kept between builds: mmdebstrap downloads every "
                "package each time). Sizes in MiB; the raw image is sparse (allocated < apparent).",
                "",
                "| variant | suite | kernel | build s | tree used | rootfs.img | allocated "
                "| initrd | vmlinuz | packages |",
                "|---|---|---|---|---|---|---|---|---|---|",
                *rows,
                "",
                "Reproduce: see the docstring of `bench/image_report.py`.",
            ]
        )
        + "\n"
    )
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
