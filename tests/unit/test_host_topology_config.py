"""Host topology from sysfs and the config file: bad input is a clear error, never a default."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvhost.config import Config, load_config
from pvhost.errors import BackendUnavailable, ConfigError, TopologyError
from pvhost.placement import detect_backend, partition_reason
from pvhost.topology import read_host_topology


def fake_sysfs(root: Path, online: str, siblings: dict[int, str]) -> Path:
    cpu = root / "devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text(online + "\n")
    for n, text in siblings.items():
        (cpu / f"cpu{n}/topology").mkdir(parents=True)
        (cpu / f"cpu{n}/topology/thread_siblings_list").write_text(text + "\n")
    return root


def test_reads_cores(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, "0-3", {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    topo = read_host_topology(sysfs)
    assert topo.online == {0, 1, 2, 3}
    assert topo.cores == (frozenset({0, 2}), frozenset({1, 3}))
    assert topo.siblings(3) == {1, 3}


def test_malformed_cpu_list_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, "0-1", {0: "0", 1: "1-x"})
    with pytest.raises(TopologyError, match=r"thread_siblings_list.*1-x"):
        read_host_topology(sysfs)


def test_empty_online_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="no online CPU"):
        read_host_topology(fake_sysfs(tmp_path, "", {}))


def test_this_hosts_topology() -> None:
    topo = read_host_topology()
    assert topo.online and all(topo.siblings(c) >= {c} for c in topo.online)


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "pvhost.toml"
    path.write_text('[placement]\npool = "1-x"\nquota = -1\n[vms."bad name"]\nqmp = "/q"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}: placement.pool" in text and "malformed CPU list" in text
    assert "placement.quota" in text
    assert "vms.bad name" in text


def test_config_rejects_unknown_keys_and_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "pvhost.toml"
    path.write_text("[service]\ncontrol = 1\n")
    with pytest.raises(ConfigError, match=r"service\.control"):
        load_config(path)
    path.write_text("[service\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_config_defaults_and_values(tmp_path: Path) -> None:
    path = tmp_path / "pvhost.toml"
    path.write_text('[placement]\nhousekeeping = "0-1"\npool = "2-5"\npolicy = "ht-aware"\n')
    config = load_config(path)
    assert config.placement.housekeeping_cpus() == {0, 1}
    assert config.placement.pool_cpus() == {2, 3, 4, 5}
    assert Config().placement.pool_cpus() is None
    # cgroup v1: resident vCPU threads by default, move is the opt-out.
    assert config.placement.cgroup1_mode == "resident"
    path.write_text('[placement]\ncgroup1_mode = "move"\n')
    assert load_config(path).placement.cgroup1_mode == "move"


def test_partition_reason_parses_the_kernels_words() -> None:
    assert partition_reason("isolated") is None
    assert partition_reason("member") is None
    assert (
        partition_reason("isolated invalid (Cpu list in cpuset.cpus not exclusive)")
        == "Cpu list in cpuset.cpus not exclusive"
    )
    assert partition_reason("root invalid") == "invalid (no reason given)"


def test_detect_refuses_a_tree_without_cpuset(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    with pytest.raises(BackendUnavailable, match=r"no cpuset placement backend"):
        detect_backend(tmp_path, tmp_path / "state")
