"""Services are found through entry points (issue #12): a distribution on sys.path with an
``extpv.services`` entry point is a service pvhost can run; one that cannot load is listed
with its error and breaks nothing else."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import ClassVar

import pytest

from pvhost.config import Config
from pvhost.errors import ConfigError
from pvhost.metrics import Metrics
from pvhost.programs import SignedProgram
from pvhost.services import (
    ENTRY_POINT_GROUP,
    ServiceContext,
    ServiceManager,
    ServicePlugin,
    VmHandle,
    discover,
)
from pvhost.services.affinity import AffinityService
from pvhost.services.base import qmp_refusal
from pvhost.services.discovery import Found
from pvhost.services.manager import ServicesSettings
from tests import plugindist

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = plugindist.install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(directory))
    return directory


def test_entry_points_are_discovered_and_broken_ones_listed(installed: Path) -> None:
    found = discover()
    assert found["affinity"].plugin is AffinityService
    assert found["echo"].plugin is not None
    assert found["echo"].plugin.__module__ == plugindist.MODULE
    assert found["echo"].origin.startswith("extpv-test-services 0.1")
    assert found["noimport"].plugin is None
    assert "DoesNotExist" in found["noimport"].error


def test_pyproject_declares_affinity_as_an_entry_point() -> None:
    """The built-in service is declared like any other, so an installed extpv lists it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"][ENTRY_POINT_GROUP]["affinity"]
    module, _, attr = target.partition(":")
    assert (module, attr) == (AffinityService.__module__, AffinityService.__name__)


def _manager(tables: dict[str, dict[str, object]]) -> ServiceManager:
    return ServiceManager(
        discover(),
        ServicesSettings(default=("echo",), tables=tables),
        lambda name: ServiceContext(signing_key=Path("/nonexistent"), log=None),  # type: ignore[arg-type]
        Metrics(),
    )


def test_a_table_for_a_service_that_takes_no_settings_is_a_config_error(installed: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[services.echo\]: the service takes no settings"):
        _manager({"echo": {"x": 1}})
    with pytest.raises(ConfigError, match="no service named 'nosuch'"):
        _manager({"nosuch": {}})


def test_config_names_services_per_vm() -> None:
    config = Config.model_validate(
        {
            "services": {"enabled": ["affinity", "memory"], "memory": {"floor_mib": 512}},
            "vms": {"a": {"qmp": "/q", "agent": "/a", "services": ["memory"]}},
        }
    )
    assert config.services.tables() == {"memory": {"floor_mib": 512}}
    assert config.vms["a"].services == ["memory"]
    with pytest.raises(ValueError, match="a service's settings are a table"):
        Config.model_validate({"services": {"memory": 3}})
    with pytest.raises(ValueError, match="String should match pattern"):
        Config.model_validate({"services": {"enabled": ["Not A Name"]}})


class _Recorder(ServicePlugin):
    """A service that records the resynchronisation hooks it gets."""

    name = "rec"
    calls: ClassVar[list[tuple[str, str, int]]] = []

    def programs(self) -> list[SignedProgram]:
        return [SignedProgram("rec", "bpf-object", b"\x7fELF", 1, b"")]

    async def on_loaded(self, vm: VmHandle, program_id: str) -> None:
        self.calls.append(("loaded", program_id, 0))

    def on_records_lost(self, vm: VmHandle, program_id: str, count: int) -> None:
        self.calls.append(("lost", program_id, count))


class _Vm:
    name = "v"
    topology = None
    vcpus: ClassVar[dict[int, object]] = {}
    protocol_version = 4

    def send(self, message: object) -> None:
        pass


def test_a_service_is_told_its_program_loaded_and_its_records_lost() -> None:
    """The resynchronisation hooks: a ProgramLoaded of its program, and every record lost on
    the way — the agent said so, or the VM's rate bound dropped them (not another service's)."""

    async def body() -> list[tuple[str, str, int]]:
        manager = ServiceManager(
            {"rec": Found("rec", "built-in", _Recorder)},
            ServicesSettings(default=("rec",), max_records_per_s=10),
            lambda name: ServiceContext(signing_key=Path("/nonexistent"), log=None),  # type: ignore[arg-type]
            Metrics(),
        )
        manager.add_vm(_Vm())  # type: ignore[arg-type]
        assert [p.program_id for p in manager.programs("v")] == ["rec"]
        manager.loaded("v", "rec")
        manager.loaded("v", "someone-elses")
        manager.lost_records("v", 3, "rec")
        manager.records("v", "rec", [b"x"] * 10)  # the bucket's burst
        manager.records("v", "rec", [b"x"] * 4)  # over the rate: dropped, and said so
        await asyncio.sleep(0.05)
        await manager.close()
        return _Recorder.calls

    assert asyncio.run(body()) == [("lost", "rec", 3), ("lost", "rec", 4), ("loaded", "rec", 0)]


def test_a_service_sends_only_the_balloons_qmp_and_reads_only_its_statistics() -> None:
    balloon = "/machine/peripheral/balloon0"
    assert qmp_refusal("balloon", {"value": 1 << 30}) is None
    assert qmp_refusal("qom-get", {"path": balloon, "property": "guest-stats"}) is None
    assert qmp_refusal("qom-set", {"path": balloon, "property": "guest-stats-polling-interval",
                                   "value": 1}) is None  # fmt: skip
    assert "'quit' is not one a service may send" in str(qmp_refusal("quit", {}))
    disk = {"path": "/machine/peripheral/disk0", "property": "drive", "value": "x"}
    assert "qom-set of property 'drive'" in str(qmp_refusal("qom-set", disk))
    assert qmp_refusal("qom-set", {"path": balloon, "property": "guest-stats"}) is not None
    assert qmp_refusal("qom-get", {"path": balloon}) is not None
