"""Build hook: compile the eBPF programs (``make -C bpf``) before packaging extpv.bpfobj.

Everything else is in pyproject.toml. A wheel built from a source tree therefore carries
``extpv/bpfobj/*.bpf.o`` and ``*.bcc.c`` (package data) even though the compiled objects
are not committed. Without clang the build fails with a hint, unless the objects were
built already (e.g. by ``./dev setup``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithBpf(build_py):
    def run(self) -> None:
        bpf = ROOT / "bpf"
        built = list((ROOT / "extpv" / "bpfobj").glob("*.bpf.o"))
        if (bpf / "Makefile").exists() and shutil.which("make") and shutil.which("clang"):
            subprocess.run(["make", "-s", "-C", str(bpf)], check=True)
        elif not built:
            raise SystemExit(
                "extpv: the eBPF objects are not built and clang/make are missing; "
                "hint: apt-get install clang llvm libbpf-dev make, or run `make -C bpf` first"
            )
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
