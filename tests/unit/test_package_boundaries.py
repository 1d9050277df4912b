"""The host never imports the guest agent, and the agent never imports the host (issue #12).

A service is added on the host alone: if pvhost imported pvagent (as it once did to find the
object it injects), the host container would carry guest code and a change to the agent could
break the host. Shared ground is ``pvproto`` (the wire) and ``extpv`` (small helpers and the
built programs), which import neither daemon.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package → the packages it must never import.
FORBIDDEN = {
    "pvhost": {"pvagent"},
    "pvagent": {"pvhost"},
    "pvproto": {"pvagent", "pvhost", "vmlab"},
    "extpv": {"pvagent", "pvhost", "vmlab"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level package names a module imports (absolute imports, at any depth of the
    module: function-local and TYPE_CHECKING imports count too), with their line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add((node.args[0].value.split(".")[0], node.lineno))
    return found


def crossings(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name, line in sorted(imported_packages(path)):
            if name in FORBIDDEN[package]:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_crosses_between_host_and_guest(package: str) -> None:
    assert crossings(package) == []


def test_the_scan_finds_a_crossing(tmp_path: Path) -> None:
    """The scan itself can fail: each import form it must see, in a module of its own."""
    module = tmp_path / "m.py"
    module.write_text(
        "import pvagent.agent\n"
        "from pvagent import bpfobj\n"
        "def f():\n"
        "    from pvagent.errors import ObjectMissing\n"
        "    importlib.import_module('pvagent.trust')\n"
    )
    assert {name for name, _ in imported_packages(module)} == {"pvagent"}
    assert sorted(line for _, line in imported_packages(module)) == [1, 2, 4, 5]


def test_importing_the_host_loads_no_guest_code() -> None:
    """What the scan cannot see (a dependency that imports the agent): import every pvhost
    module in a fresh interpreter and look at what got loaded."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "pvhost").rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pvagent'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


#: What only a service knows: its programs' maps and ring buffers, its messages and modules.
#: The generic agent (protocol 4) must name none of them (issue #12 item 2).
SERVICE_NAMES = (
    "pv_affinity",
    "pv_tracked",
    "pv_state",
    "AffinityUpdate",
    "AffinityResult",
    "affinity_event",
    "affinity_tracker",
    "AffinityTracker",
    "sched_setaffinity",
    "procscan",
)


def service_names(package: Path) -> list[str]:
    """``path:line: name`` for every service-specific name in the package's Python code
    (identifiers, attributes, strings, imports; comments and docstrings are prose)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) in docstrings:
                continue
            texts: list[str] = []
            if isinstance(node, ast.Name):
                texts = [node.id]
            elif isinstance(node, ast.Attribute):
                texts = [node.attr]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts = [node.value]
            elif isinstance(node, ast.alias):
                texts = [node.name]
            elif isinstance(node, ast.ImportFrom) and node.module:
                texts = [node.module]
            for text in texts:
                found += [
                    f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}: {name}"
                    for name in SERVICE_NAMES
                    if name in text
                ]
    return found


def test_the_guest_agent_holds_no_service_code() -> None:
    assert service_names(ROOT / "pvagent") == []
    assert not list((ROOT / "pvagent").rglob("*affinity*"))
    assert not list((ROOT / "pvagent").rglob("tracker.py"))


def test_the_service_name_scan_can_fail(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        '"""Docstrings may say pv_affinity."""\n'
        "from pvhost.services.affinity_event import decode\n"
        "RING = 'pv_affinity'\n"
        "def f(update):\n"
        "    return isinstance(update, AffinityUpdate)\n"
    )
    assert {line.split(": ")[1] for line in service_names(tmp_path)} == {
        "affinity_event",
        "pv_affinity",
        "AffinityUpdate",
    }
