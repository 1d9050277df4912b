"""The appliance's Ansible content: ansible-lint (production profile), syntax, templates.

No root needed: these read the playbook and render templates into a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLE = REPO / "ansible" / "roles" / "pvhost"


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed (the `dev` and `appliance` extras provide it)")
        return found
    return str(path)


def _run(argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", NO_COLOR="1", ANSIBLE_LOCAL_TEMP="/tmp")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _role_check(extra_vars: str) -> tuple[int, str]:
    """``ansible-playbook site.yml --tags pvhost -e EXTRA_VARS --check``: its exit status and
    its output (stdout, then stderr)."""
    res = _run(
        [_tool("ansible-playbook"), "site.yml", "--tags", "pvhost", "-e", extra_vars, "--check"]
    )
    return res.returncode, res.stdout + res.stderr


def test_ansible_lint_production_profile_passes() -> None:
    res = _run([_tool("ansible-lint"), "--profile", "production", "--nocolor"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


@pytest.mark.parametrize("where", ["root", "ansible"])
def test_site_yml_passes_syntax_check_from_root_and_from_ansible_dir(where: str) -> None:
    cwd = REPO if where == "root" else REPO / "ansible"
    res = _run([_tool("ansible-playbook"), "site.yml", "--syntax-check"], cwd=cwd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_default_inventory_is_localhost_with_local_connection() -> None:
    res = _run([_tool("ansible-inventory"), "--list", "--yaml"])
    assert res.returncode == 0, res.stderr
    assert "localhost" in res.stdout
    assert "ansible_connection: local" in res.stdout


def _render(tmp_path: Path, template: Path, extra_vars: dict[str, object]) -> str:
    """Render a role template with the role's defaults and vars, as the role would."""
    out = tmp_path / template.name.removesuffix(".j2")
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n"
        f"  vars_files: [{ROLE}/defaults/main.yml, {ROLE}/vars/main.yml]\n"
        "  tasks:\n    - ansible.builtin.template:\n"
        f"        src: {template}\n        dest: {out}\n        mode: '0644'\n"
    )
    # A list goes as JSON (key=value makes every value a string).
    args = [
        json.dumps({k: v}) if isinstance(v, list) else f"{k}={v}" for k, v in extra_vars.items()
    ]
    res = _run(
        [_tool("ansible-playbook"), str(playbook), "-e", "role_path=" + str(ROLE)]
        + [a for kv in args for a in ("-e", kv)]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return out.read_text()


def test_quadlet_unit_runs_pvhost_privileged_in_host_namespaces(tmp_path: Path) -> None:
    text = _render(tmp_path, ROLE / "templates" / "pvhost.container.j2", {})
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key, value))
    container = {(k, v) for s, k, v in entries if s == "Container"}
    assert ("Image", "localhost/pvhost:latest") in container
    assert ("Exec", "pvhost run --config /etc/extpv/pvhost.toml") in container
    assert ("HealthCmd", "pvctl status") in container
    assert {v for k, v in container if k == "Volume"} == {
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "/run/extpv:/run/extpv:rw",
        "/etc/extpv:/etc/extpv:ro",
    }
    podman_args = next(v for k, v in container if k == "PodmanArgs").split()
    assert {"--privileged", "--pid=host", "--cgroupns=host"} <= set(podman_args)
    assert ("Network", "host") in container
    assert ("Service", "Restart", "always") in entries
    assert ("Install", "WantedBy", "multi-user.target default.target") in entries
    quadlet = shutil.which("quadlet") or "/usr/libexec/podman/quadlet"
    if Path(quadlet).exists():  # podman >= 4.4: let the generator itself read the unit
        unit_dir = tmp_path / "units"
        unit_dir.mkdir()
        (unit_dir / "pvhost.container").write_text(text)
        res = subprocess.run(
            [quadlet, "-dryrun"],
            env=dict(os.environ, QUADLET_UNIT_DIRS=str(unit_dir)),
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert "--pid=host" in res.stdout


def test_rendered_pvhost_toml_is_what_the_role_variables_say(tmp_path: Path) -> None:
    text = _render(
        tmp_path,
        ROLE / "templates" / "pvhost.toml.j2",
        {"pvhost_pool_cpus": "2-5", "pvhost_policy": "ht-aware", "pvhost_quota": 3},
    )
    data = tomllib.loads(text)
    assert data["placement"] == {
        "backend": "auto",
        "housekeeping": "0",
        "pool": "2-5",
        "cgroup1_mode": "resident",
        "policy": "ht-aware",
        "quota": 3,
        "rate": 20.0,
        "burst": 5,
    }
    assert data["service"]["control_socket"] == "/run/extpv/pvhost.sock"
    assert data["service"]["affinity_program"] == "/opt/extpv/share/affinity.bpf.o"
    try:
        from pvhost.config import load_config
    except ImportError:
        return  # pvhost's config model is not in this checkout: the TOML shape is checked above
    config = load_config(tmp_path / "pvhost.toml")
    assert config.placement.policy == "ht-aware"
    assert config.placement.quota == 3
    assert config.placement.isolate_from == []
    assert config.placement.cgroup1_mode == "resident"


def test_cgroup1_mode_is_rendered(tmp_path: Path) -> None:
    """The opt-out from the default (resident) reaches pvhost.toml."""
    toml = ROLE / "templates" / "pvhost.toml.j2"
    text = _render(tmp_path, toml, {"pvhost_cgroup1_mode": "move"})
    assert tomllib.loads(text)["placement"]["cgroup1_mode"] == "move"


def test_isolate_from_is_rendered_as_a_list_of_cpusets(tmp_path: Path) -> None:
    cpusets = ["/extpv-demo-load", "/machine.slice"]
    text = _render(
        tmp_path, ROLE / "templates" / "pvhost.toml.j2", {"pvhost_isolate_from": cpusets}
    )
    assert tomllib.loads(text)["placement"]["isolate_from"] == cpusets


def test_libvirt_domains_turn_on_libvirt_in_the_containerized_pvhost(tmp_path: Path) -> None:
    """pvhost_libvirt_domains set: the rendered pvhost.toml has ``[libvirt] enabled`` with the
    role's URI, and the container gets libvirtd's sockets and the agent channels' directory;
    unset: neither."""
    toml = ROLE / "templates" / "pvhost.toml.j2"
    unit = ROLE / "templates" / "pvhost.container.j2"
    libvirt_volumes = {
        "/run/libvirt:/run/libvirt:rw",
        "/var/lib/libvirt/qemu/channel:/var/lib/libvirt/qemu/channel:rw",
    }
    assert "libvirt" not in tomllib.loads(_render(tmp_path, toml, {}))
    assert not libvirt_volumes & set(
        re.findall(r"^Volume=(.*)$", _render(tmp_path, unit, {}), re.M)
    )
    on = {"pvhost_libvirt_domains": ["web 1", "db.ø"], "pvhost_libvirt_uri": 'qemu:///system?x="y"'}
    data = tomllib.loads(_render(tmp_path, toml, on))
    assert data["libvirt"] == {"enabled": True, "uri": 'qemu:///system?x="y"'}
    volumes = set(re.findall(r"^Volume=(.*)$", _render(tmp_path, unit, on), re.M))
    assert libvirt_volumes <= volumes
    data = tomllib.loads(_render(tmp_path, toml, {"pvhost_libvirt_domains": "all"}))
    assert data["libvirt"]["enabled"] is True
    try:
        from pvhost.config import load_config
    except ImportError:
        return
    assert load_config(tmp_path / "pvhost.toml").libvirt.enabled


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("pvhost_housekeeping_cpus", "0-x", "must be kernel cpulists"),
        ("pvhost_quota", "9000", "pvhost_quota must be 0-8192"),
        ("pvhost_policy", "fastest", "pvhost_policy"),
        ("pvhost_metrics_listen", "9464", 'must be "host:port"'),
        ("pvhost_cgroup1_mode", "fast", "pvhost_cgroup1_mode"),
    ],
)
def test_bad_role_variables_fail_before_any_change_with_a_clear_message(
    var: str, value: str, message: str
) -> None:
    returncode, out = _role_check(f"{var}={value}")
    assert returncode != 0
    assert message in out, out[-3000:]
    assert "changed=0" in out


def test_libvirt_domains_without_libvirt_fail_before_any_change_with_a_clear_message() -> None:
    """pvhost_libvirt_domains on a host without libvirt's directories: the role says libvirt is
    missing before the container (which would bind-mount them) is touched. The directories
    are overridden with paths that exist nowhere, so the test does not depend on this host."""
    missing = "/nonexistent/extpv-test/libvirt"
    extra = {
        "pvhost_libvirt_domains": ["web 1"],
        "_pvhost_libvirt_volumes": [f"{missing}:/run/libvirt:rw"],
    }
    returncode, out = _role_check(json.dumps(extra))
    assert returncode != 0, out[-3000:]
    assert f"{missing} does not exist" in re.sub(r"\s+", " ", out), out[-3000:]
    assert "install libvirt and start its daemon" in re.sub(r"\s+", " ", out), out[-3000:]
    assert "changed=0" in out
