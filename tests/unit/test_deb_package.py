"""The guest agent's Debian package (packaging/build-deb) and the guest_agent role's input checks.

No root: the package is built into a temporary directory and read with dpkg-deb; the role's
checks run against localhost (they fail before anything is copied). That the package installs
and works in a stock Debian 12 guest is tests/vm/test_6_guest_agent_deb.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.debbuild import build_deb

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: What the agent may import besides the standard library and its own packages: Debian
#: packages (python3-cryptography, python3-pyudev, python3-bpfcc) and the carried pydantic.
THIRD_PARTY = {"pydantic", "cryptography", "pyudev", "bcc"}
PACKAGED = ("pvagent", "pvproto", "extpv")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_deb(tmp_path_factory.mktemp("deb"))


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_package_control_fields(deb: Path) -> None:
    fields = dict(
        line.split(": ", 1)
        for line in _dpkg_deb("-f", str(deb)).splitlines()
        if ": " in line and not line.startswith(" ")
    )
    assert fields["Package"] == "pvagent"
    assert fields["Architecture"] == "amd64"
    depends = fields["Depends"]
    for dep in ("python3-pyudev", "python3-cryptography", "libbpf1", "systemd", "udev"):
        assert dep in depends
    # Debian 13: its python3-pydantic (2.x); Debian 12 (Python 3.11): the carried copy.
    assert "python3-pydantic (>= 2) | python3 (<< 3.12~)" in depends
    assert "python3-bpfcc" in fields["Suggests"]
    assert _dpkg_deb("-I", str(deb), "conffiles").split() == ["/etc/pvagent/pvagent.toml"]


def test_package_contents(deb: Path) -> None:
    files = {line.split()[-1].removeprefix(".") for line in _dpkg_deb("-c", str(deb)).splitlines()}
    lib = "/usr/lib/pvagent/python"
    for path in (
        "/usr/bin/pvagent",
        f"{lib}/pvagent/cli.py",
        f"{lib}/extpv/bpfobj/affinity.bpf.o",
        f"{lib}/extpv/bpfobj/affinity.bcc.c",
        f"{lib}/pvproto/messages.py",
        f"{lib}/extpv/tomlconfig.py",
        "/usr/lib/pvagent/vendor/python3.11/pydantic/__init__.py",
        "/usr/lib/systemd/system/pvagent.service",
        "/usr/lib/udev/rules.d/99-pvagent.rules",
        "/etc/pvagent/pvagent.toml",
        "/etc/pvagent/trusted.d/",
    ):
        assert path in files, f"{path} is not in the package"
    core = [f for f in files if "/vendor/python3.11/pydantic_core/" in f and f.endswith(".so")]
    assert core and all("cpython-311-x86_64" in f for f in core), core
    # The guest never gets host code, nor a key: the trusted-key directory ships empty.
    assert not [f for f in files if "/pvhost/" in f or "/vmlab/" in f]
    assert not [f for f in files if f.startswith("/etc/pvagent/trusted.d/") and f[-1] != "/"]
    assert not [f for f in files if "__pycache__" in f]


def test_packaged_unit_starts_the_packaged_program(deb: Path, tmp_path: Path) -> None:
    _dpkg_deb("-x", str(deb), str(tmp_path))
    unit = (tmp_path / "usr/lib/systemd/system/pvagent.service").read_text().splitlines()
    assert "ExecStart=/usr/bin/pvagent run" in unit
    # Otherwise the unit the agent ships (pvagent/data), not a copy that drifts from it.
    source = (REPO / "pvagent/data/pvagent.service").read_text().splitlines()
    differ = set(source) ^ set(unit)
    assert all(line.startswith(("ExecStart=", "# python3 -m:")) for line in differ), differ
    rule = (REPO / "pvagent/data/99-pvagent.rules").read_text()
    assert (tmp_path / "usr/lib/udev/rules.d/99-pvagent.rules").read_text() == rule


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_packaged_modules_import_nothing_the_package_lacks() -> None:
    allowed = set(sys.stdlib_module_names) | THIRD_PARTY | set(PACKAGED)
    bad = {
        str(path.relative_to(REPO)): sorted(_imports(path) - allowed)
        for name in PACKAGED
        for path in (REPO / name).rglob("*.py")
        if _imports(path) - allowed
    }
    assert not bad, f"the agent package would lack (pvhost? a PyPI-only module?): {bad}"


def _role_run(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "guests:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        "      ansible_python_interpreter: '{{ ansible_playbook_python }}'\n"
    )
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"))
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), "ansible/guests.yml"]
    for k, v in extra.items():
        argv += ["-e", f"{k}={v}"]
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_role_refuses_a_missing_package_with_the_build_command(tmp_path: Path) -> None:
    res = _role_run(tmp_path, guest_agent_deb=str(tmp_path / "pvagent_9_amd64.deb"))
    assert res.returncode != 0
    assert "does not exist on the controller: build it with" in res.stdout
    assert "packaging/build-deb" in res.stdout


def test_role_refuses_the_private_signing_key(tmp_path: Path) -> None:
    pkg = tmp_path / "pvagent_0_amd64.deb"
    pkg.write_bytes(b"!<arch>\n")
    key = tmp_path / "signing.key"
    key.write_text(
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n"
    )
    res = _role_run(tmp_path, guest_agent_deb=str(pkg), guest_agent_trusted_key=str(key))
    assert res.returncode != 0
    assert "never the private signing key" in res.stdout
