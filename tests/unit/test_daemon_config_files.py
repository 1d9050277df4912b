"""Both daemons' configuration files: a hostile or broken file is a config error, never a crash.

pvagent and pvhost read their TOML through the one loader (``extpv.tomlconfig``): every problem
is the daemon's own ConfigError, naming the file (and the key), with every key error at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

import pvagent.config
import pvagent.errors
import pvhost.config
import pvhost.errors

Loader = Callable[[Path], object]

DAEMONS = [
    pytest.param(pvagent.config.load_config, pvagent.errors.ConfigError, id="pvagent"),
    pytest.param(pvhost.config.load_config, pvhost.errors.ConfigError, id="pvhost"),
]


@pytest.mark.security
@pytest.mark.parametrize(("load", "error"), DAEMONS)
def test_deeply_nested_toml_is_a_config_error(
    tmp_path: Path, load: Loader, error: type[Exception]
) -> None:
    """tomllib recurses per bracket: 100 000 of them used to escape as a RecursionError."""
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100_000)
    with pytest.raises(error, match=rf"^{re.escape(str(path))}: nested too deeply") as raised:
        load(path)
    assert not isinstance(raised.value, RecursionError)


@pytest.mark.security
@pytest.mark.parametrize(("load", "error"), DAEMONS)
def test_non_utf8_file_is_a_config_error(
    tmp_path: Path, load: Loader, error: type[Exception]
) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("# r\xe9glages\n".encode("latin-1"))
    with pytest.raises(error, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 3\)"):
        load(path)


@pytest.mark.security
@pytest.mark.parametrize(("load", "error"), DAEMONS)
def test_a_file_too_large_to_be_a_config_is_refused(
    tmp_path: Path, load: Loader, error: type[Exception]
) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(error, match="larger than"):
        load(path)


def test_agent_reports_every_bad_key_at_once(tmp_path: Path) -> None:
    """Like pvhost: one line per bad key, so a user fixes the file in one round."""
    path = tmp_path / "pvagent.toml"
    path.write_text('trust = "maybe"\ncoalesce_ms = -1\n')
    with pytest.raises(pvagent.errors.ConfigError) as raised:
        pvagent.config.load_config(path)
    lines = str(raised.value).splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        [str(path), "trust"],
        [str(path), "coalesce_ms"],
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["/"]', "is the root cpuset"),
        ('["machine.slice/../.."]', "without '.' or '..' parts"),
    ],
)
def test_isolate_from_names_cpusets_pvhost_can_take_cpus_from(
    tmp_path: Path, value: str, message: str
) -> None:
    path = tmp_path / "pvhost.toml"
    path.write_text(f"[placement]\nisolate_from = {value}\n")
    with pytest.raises(pvhost.errors.ConfigError, match=re.escape(message)) as raised:
        pvhost.config.load_config(path)
    assert str(raised.value).startswith(f"{path}: placement.isolate_from")


def test_isolate_from_paths_are_kept_in_one_form(tmp_path: Path) -> None:
    path = tmp_path / "pvhost.toml"
    path.write_text('[placement]\nisolate_from = ["machine.slice", "/system.slice//x/"]\n')
    config = pvhost.config.load_config(path)
    assert config.placement.isolate_from == ["/machine.slice", "/system.slice/x"]
