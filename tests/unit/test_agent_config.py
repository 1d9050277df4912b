"""Configuration file and topology parsing: bad input gets a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.config import AgentConfig, load_config
from pvagent.errors import AgentError, ConfigError, LoadFailed, ObjectMissing
from pvagent.loaders import bcc as bcc_loader
from pvagent.topology import read_topology


def test_config_defaults_and_values(tmp_path: Path) -> None:
    path = tmp_path / "pvagent.toml"
    path.write_text('port_name = "org.example.9"\ntrust = "any"\ndocuments_dir = ""\n')
    config = load_config(path)
    assert (config.port_name, config.trust, config.documents_dir) == ("org.example.9", "any", None)
    assert AgentConfig().port_name == "org.extpv.agent.0"
    assert AgentConfig().documents_dir == Path("/run/pvagent")
    # An older agent's keys still load (an upgraded guest keeps its config file).
    path.write_text('coalesce_ms = 5\nplacement_file = ""\n')
    assert load_config(path).documents_dir == Path("/run/pvagent")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('trust = "maybe"', "trust"),
        ("coalesce_ms = -1", "coalesce_ms"),
        ("unknown = 1", "unknown"),
        ("port_name = ", "not valid TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "pvagent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_topology_from_sysfs(tmp_path: Path) -> None:
    (tmp_path / "online").write_text("0-3\n")
    for cpu, sib in {0: "0-1", 1: "0-1", 2: "2", 3: "3"}.items():
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(sib)
    topology = read_topology(tmp_path)
    assert topology.online_vcpus == [0, 1, 2, 3] and topology.sibling_groups == [[0, 1]]
    (tmp_path / "online").write_text("zero")
    with pytest.raises(AgentError, match="online"):
        read_topology(tmp_path)


def test_missing_object_has_a_hint() -> None:
    with pytest.raises(ObjectMissing, match="make -C bpf"):
        bpfobj.read("nonexistent.bpf.o")
    assert bpfobj.path("affinity.bpf.o").is_file()


def test_bcc_header_tree_is_merged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian splits a kernel's headers in two packages; bcc needs them as one tree."""
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    # Fake, named as such: a running kernel with no header package of its own cannot be
    # produced at will, so the loader is told it runs a release nothing is installed for.
    monkeypatch.setattr(bcc_loader.platform, "release", lambda: "0.0-no-such-kernel")
    src = tmp_path / "src"
    for name, rel in [("common", "include/linux/x.h"), ("amd64", "include/generated/y.h")]:
        path = src / f"linux-headers-6.1.0-9-{name}" / rel
        path.parent.mkdir(parents=True)
        path.write_text(name)
    (src / "linux-headers-5.10.0-1-common").mkdir()  # incomplete pair: ignored
    tree = bcc_loader.kernel_source(tmp_path / "cache", src=src)
    assert tree is not None
    assert (tree / "include/linux/x.h").read_text() == "common"
    assert (tree / "include/generated/y.h").is_symlink()
    assert bcc_loader.kernel_source(tmp_path / "cache", src=src) == tree  # cached
    with pytest.raises(LoadFailed, match="linux-headers"):
        bcc_loader.kernel_source(tmp_path / "cache2", src=tmp_path / "empty")
