"""The deployed wheels are one side each: the host container gets no guest agent code and a
guest image no host code (packaging/build-wheel; issue #12: "the host container carries no
guest code; the guest image carries no host code")."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def build(side: str, out: Path) -> Path:
    res = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "build-wheel"), side, "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {side: build(side, out) for side in ("host", "agent")}


def contents(wheel: Path) -> tuple[set[str], dict[str, str], list[str]]:
    """Top-level names, {file: text} of the dist-info, and every path."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = {n.split("/", 1)[1]: z.read(n).decode() for n in names if ".dist-info/" in n}
    top = {n.split("/", 1)[0] for n in names if ".dist-info/" not in n}
    return top, info, names


def test_the_host_wheel_has_host_code_and_no_guest_agent(wheels: dict[str, Path]) -> None:
    top, info, names = contents(wheels["host"])
    assert wheels["host"].name == f"extpv_host-{PROJECT['version']}-py3-none-any.whl"
    assert top == {"pvhost", "pvproto", "extpv", "vmlab"}
    assert "extpv/bpfobj/affinity.bpf.o" in names, "the program pvhost injects"
    scripts = info["entry_points.txt"]
    assert "pvhost = pvhost.cli:main" in scripts and "pvctl = pvhost.ctl:main" in scripts
    assert "pvagent" not in scripts
    assert "[extpv.services]" in scripts and "affinity = pvhost.services.affinity" in scripts
    meta = Parser().parsestr(info["METADATA"])
    requires = meta.get_all("Requires-Dist")
    for dep in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["host"]:
        name = dep.split(">")[0].split("<")[0]
        assert any(r.startswith(name) for r in requires), (dep, requires)
    assert meta.get_all("Provides-Extra") == ["libvirt"]


def test_the_agent_wheel_has_the_agent_and_no_host_code(wheels: dict[str, Path]) -> None:
    top, info, names = contents(wheels["agent"])
    assert top == {"pvagent", "pvproto", "extpv"}
    assert "extpv/bpfobj/affinity.bpf.o" in names
    assert "pvagent/data/pvagent.service" in names, "the unit guest images install"
    scripts = info["entry_points.txt"]
    assert "pvagent = pvagent.cli:main" in scripts
    assert "pvhost" not in scripts and "pvctl" not in scripts and "extpv.services" not in scripts
    requires = Parser().parsestr(info["METADATA"]).get_all("Requires-Dist")
    assert not any(r.startswith(("qemu.qmp", "prometheus", "libvirt")) for r in requires)


def test_the_same_sources_give_the_same_wheel(wheels: dict[str, Path], tmp_path: Path) -> None:
    again = build("agent", tmp_path)
    assert again.read_bytes() == wheels["agent"].read_bytes()


def test_an_unknown_side_is_refused_with_the_choices(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "build-wheel"), "guest", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "invalid choice: 'guest' (choose from 'agent', 'host')" in res.stderr
