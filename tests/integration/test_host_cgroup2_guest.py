"""Run the cgroup v2 backend tests inside a real Linux guest (this host's cpuset is v1).

The guest is a stock Debian ≥ 6.7 kernel booted under QEMU (TCG) with an initramfs built here
from the running interpreter, the packages it imports and this repository: no image build,
no network inside, about 15 s. The guest runs ``tests/integration/test_host_cgroup2.py``
against its own cgroup2 hierarchy (cpuset controller, remote partitions).

Kernel, first found: ``$EXTPV_GUEST_KERNEL``; ``images/out/*/vmlinuz`` (the guest image
build); a Debian ``linux-image-6.1x…-cloud-amd64`` fetched once with ``apt-get download``
into ``~/.cache/extpv/kernel``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import absent

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache/extpv/kernel"

_INIT = """#!{python}
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
for src, dst, fs in [("proc", "/proc", "proc"), ("sys", "/sys", "sysfs"),
                     ("dev", "/dev", "devtmpfs"), ("tmp", "/tmp", "tmpfs"),
                     ("none", "/sys/fs/cgroup", "cgroup2")]:
    libc.mount(src.encode(), dst.encode(), fs.encode(), 0, None)
out = open("/dev/ttyS0", "w", buffering=1)
os.dup2(out.fileno(), 1)
os.dup2(out.fileno(), 2)
env = dict(os.environ, PYTHONPATH="/repo:/site", HOME="/tmp", PYTHONDONTWRITEBYTECODE="1",
           EXTPV_REQUIRE_CAPABILITIES="1")
os.chdir("/repo")
rc = subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                      "--color=no", "tests/integration/test_host_cgroup2.py"], env=env)
print("GUEST-PYTEST-RC", rc, flush=True)
libc.sync()
libc.reboot(0x4321FEDC)
"""


def _kernel_version(path: Path) -> tuple[int, int]:
    m = re.search(r"(\d+)\.(\d+)", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_kernel() -> Path | None:
    if os.environ.get("EXTPV_GUEST_KERNEL"):
        return Path(os.environ["EXTPV_GUEST_KERNEL"])
    built = sorted((ROOT / "images/out").glob("*/vmlinuz"))
    if built:
        return built[0]
    cached = sorted(CACHE.glob("boot/vmlinuz-*"), key=_kernel_version)
    if cached and _kernel_version(cached[-1]) >= (6, 7):
        return cached[-1]
    search = subprocess.run(
        ["apt-cache", "search", "--names-only", r"^linux-image-6\.[0-9]+\..*-cloud-amd64$"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    names = [line.split()[0] for line in search.stdout.splitlines()]
    names = [n for n in names if _kernel_version(Path(n.removeprefix("linux-image-"))) >= (6, 7)]
    if not names:
        return None
    name = max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)[:4]])
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "-q", name], cwd=CACHE, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    deb = next(CACHE.glob(f"{name}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE)], check=True, timeout=120)
    deb.unlink()
    found = sorted(CACHE.glob("boot/vmlinuz-*"), key=_kernel_version)
    return found[-1] if found else None


def _copy(src: Path, dst_root: Path, ignore: shutil._IgnoreFn | None = None) -> None:
    dst = dst_root / src.relative_to("/") if src.is_absolute() else dst_root / src
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=False, ignore=ignore, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def build_initramfs(out: Path) -> Path:
    """An initramfs holding this interpreter, the packages the tests import, and the repo."""
    tree = out / "root"
    python = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = shutil.ignore_patterns(
        "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
        "site-packages", "dist-packages", "config-*", "__pycache__",
    )  # fmt: skip
    _copy(python, tree)
    _copy(stdlib, tree, skip)
    # Third-party packages, found by importing what the guest's tests import.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, pytest, pydantic, pvhost.placement, pvproto, vmlab, packaging.version, "
         "pygments, iniconfig, pluggy, _pytest.pytester; "
         "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    site = tree / "site"
    site.mkdir()
    for name in probe.stdout.split():
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec and spec.origin else None
        if origin is None and spec is not None and spec.submodule_search_locations:
            # A namespace package (qemu.qmp's ``qemu``): copy its directories whole.
            for location in spec.submodule_search_locations:
                shutil.copytree(location, site / name, ignore=skip, dirs_exist_ok=True)
            continue
        if origin is None or not origin.is_absolute() or not origin.exists():
            continue  # built-in or frozen
        if origin.is_relative_to(stdlib) or name in (
            "pvhost",
            "pvproto",
            "pvagent",
            "extpv",
            "vmlab",
            "tests",
        ):
            continue
        src = origin.parent if origin.name == "__init__.py" else origin
        if src.is_dir():
            shutil.copytree(src, site / src.name, ignore=skip)
        else:
            shutil.copy2(src, site / src.name)
    repo = tree / "repo"
    repo.mkdir()
    for part in ("pvhost", "pvproto", "extpv", "vmlab", "tests"):
        shutil.copytree(ROOT / part, repo / part, ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", repo / "pyproject.toml")
    # Shared libraries of the interpreter and of every extension module.
    objects = [python, *tree.rglob("*.so*")]
    libs: set[str] = set()
    for obj in objects:
        ldd = subprocess.run(["ldd", str(obj)], capture_output=True, text=True, check=False)
        libs.update(re.findall(r"(/\S+) \(0x", ldd.stdout))
    for lib in libs:
        real = Path(os.path.realpath(lib))
        dst = tree / lib.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(real, dst)
    # Bytecode compiled here, by the same interpreter the guest runs: under TCG the guest
    # compiling what pytest imports cost most of its run. Unchecked hashes: the tree is the
    # guest's read-only truth, and a cpio need not keep the sources' mtimes.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(tree), "-p", "/",
         "--invalidation-mode", "unchecked-hash", str(tree)],
        check=True, capture_output=True,
    )  # fmt: skip
    for d in ("proc", "sys", "dev", "tmp"):
        (tree / d).mkdir(exist_ok=True)
    init = tree / "init"
    init.write_text(_INIT.format(python=python))
    init.chmod(0o755)
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=files,
                          capture_output=True, check=True).stdout  # fmt: skip
    image = out / "initrd.gz"
    image.write_bytes(gzip.compress(cpio, compresslevel=1))
    shutil.rmtree(tree)
    return image


def test_cgroup2_backend_in_a_guest_kernel(tmp_path: Path) -> None:
    kernel = find_kernel()
    if kernel is None:
        absent("no guest kernel ≥ 6.7: set EXTPV_GUEST_KERNEL or build images/ first")
    initrd = build_initramfs(tmp_path)
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "4",
        "-m", "1536", "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
    ]  # fmt: skip
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the guest did not finish within 300 s: {(err.stdout or '')[-3000:]!s}")
    console = run.stdout
    assert "Oops" not in console and "Kernel panic" not in console, console[-4000:]
    m = re.search(r"GUEST-PYTEST-RC (\d+)", console)
    assert m is not None, f"the guest never reported (rc {run.returncode}):\n{console[-4000:]}"
    assert m.group(1) == "0", console[-6000:]
    assert "3 passed" in console, console[-4000:]
