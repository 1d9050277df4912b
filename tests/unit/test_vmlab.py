"""vmlab without booting anything: command line, image checks, VM names, crash detection."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vmlab
from extpv.names import VM_NAME_MAX
from pvhost.config import Config
from pvhost.registry import scan_vms
from vmlab import cli, machine
from vmlab.machine import READY_PATTERN

# Recorded from a QEMU 7.2 multi-threaded TCG boot that hit the known race (shortened).
OOPS_CONSOLE = """\
[    0.000000] Linux version 6.1.0-21-amd64 (debian-kernel@lists.debian.org)
[    2.911462] int3: 0000 [#1] PREEMPT SMP NOPTI
[    2.911462] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    2.911462] RIP: 0010:sched_clock_cpu+0x9/0xb0
[    2.915731] Kernel panic - not syncing: Fatal exception
"""


def _image(tmp_path: Path) -> Path:
    for name in ("rootfs.img", "vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_qemu_argv_wires_the_contract_paths(tmp_path: Path) -> None:
    spec = vmlab.VMSpec(name="db1", image=_image(tmp_path), smp=3, memory_mib=512,
                        runtime_dir=tmp_path / "vms")  # fmt: skip
    argv = vmlab.qemu_argv(spec, ["-accel", "tcg,thread=multi", "-cpu", "max"])
    line = " ".join(argv)
    d = tmp_path / "vms" / "db1"
    assert argv[argv.index("-name") + 1] == "db1,debug-threads=on"
    assert argv[argv.index("-smp") + 1] == "3"
    assert f"path={d / 'qmp.sock'}" in line
    assert f"path={d / 'launcher-qmp.sock'}" in line
    assert f"path={d / 'agent.sock'},server=on,wait=off" in line
    assert "name=org.extpv.agent.0" in line
    assert "snapshot=on" in line
    assert "extpv.testhook" not in line and "org.extpv.test.0" not in line


def test_test_hook_is_only_wired_when_asked(tmp_path: Path) -> None:
    spec = vmlab.VMSpec(name="t", image=_image(tmp_path), runtime_dir=tmp_path, test_hook=True)
    line = " ".join(vmlab.qemu_argv(spec, []))
    assert "extpv.testhook=1" in line and "name=org.extpv.test.0" in line


def test_ssh_port_is_a_loopback_forward_on_a_restricted_nic(tmp_path: Path) -> None:
    plain = " ".join(vmlab.qemu_argv(vmlab.VMSpec("t", _image(tmp_path), runtime_dir=tmp_path), []))
    assert "-netdev" not in plain, "no network unless asked"
    spec = vmlab.VMSpec(name="t", image=_image(tmp_path), runtime_dir=tmp_path, ssh_port=2222)
    argv = vmlab.qemu_argv(spec, [])
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"
    assert argv[argv.index("-device", argv.index("-netdev")) + 1] == "virtio-net-pci,netdev=net0"
    with pytest.raises(vmlab.LauncherError, match="not a TCP port"):
        vmlab.VMSpec(name="t", image=_image(tmp_path), runtime_dir=tmp_path, ssh_port=70000)
    with pytest.raises(vmlab.LauncherError, match="empty machine"):
        vmlab.VMSpec(name="t", image=None, runtime_dir=tmp_path, ssh_port=2222)


def test_ready_pattern_matches_autologin_and_a_stock_login_prompt() -> None:
    rx = re.compile(READY_PATTERN)
    assert rx.search("\r\nextpv-guest login: root (automatic login)\r\n")
    assert rx.search("Debian GNU/Linux 12 stock-guest ttyS0\r\n\r\nstock-guest login: ")
    assert not rx.search("[    1.0] systemd-logind: New seat seat0, login: ok")


def test_empty_machine_is_paused_and_leaves_agent_sock_to_the_test(tmp_path: Path) -> None:
    spec = vmlab.VMSpec.empty("t", tmp_path, smp=1, maxcpus=3)
    argv = vmlab.qemu_argv(spec)
    line = " ".join(argv)
    assert "-S" in argv and "-kernel" not in argv and "-drive" not in argv
    assert argv[argv.index("-smp") + 1] == "1,maxcpus=3"
    assert argv[argv.index("-m") + 1] == "64"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi" and "-cpu" not in argv
    assert f"path={tmp_path / 't' / 'qemu-agent.sock'}," in line
    assert f"path={tmp_path / 't' / 'agent.sock'}" not in line
    with pytest.raises(vmlab.LauncherError, match="empty machine"):
        vmlab.VMSpec(name="t", image=None, runtime_dir=tmp_path, test_hook=True)


def test_missing_image_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"x")
    spec = vmlab.VMSpec(name="x", image=tmp_path, runtime_dir=tmp_path / "vms")
    with pytest.raises(vmlab.ImageError, match=r"lacks rootfs\.img, initrd\.img.*build-image"):
        vmlab.start(spec)


def test_bad_vm_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(vmlab.VMNameError, match=r"invalid VM name '\.\./etc'"):
        vmlab.VMSpec(name="../etc", image=_image(tmp_path), runtime_dir=tmp_path / "vms")


def test_a_name_pvhost_would_ignore_is_refused_with_the_rule(tmp_path: Path) -> None:
    """64 characters: the old launcher started it, and pvhost then silently ignored the VM."""
    name = "v" * (VM_NAME_MAX + 1)
    with pytest.raises(vmlab.VMNameError, match=rf"use 1 to {VM_NAME_MAX} letters"):
        vmlab.VMSpec(name=name, image=_image(tmp_path), runtime_dir=tmp_path / "vms")
    assert not (tmp_path / "vms").exists()


NAMES = [
    "a", "db1", "db1.prod_2-x", "9lives", "v" * VM_NAME_MAX, "v" * (VM_NAME_MAX + 1),
    "-x", ".hidden", "_x", "a b", "ünï", "a:b", "x" * 200,
]  # fmt: skip


def test_the_lab_starts_exactly_the_vms_pvhost_picks_up(tmp_path: Path) -> None:
    """One VM-name rule: a VM the lab accepts ⇔ pvhost's runtime-directory scan sees it."""
    runtime = tmp_path / "vms"
    runtime.mkdir()
    accepted = set()
    for name in NAMES:
        try:
            vmlab.VMSpec(name=name, image=None, runtime_dir=runtime)
        except vmlab.VMNameError:
            pass
        else:
            accepted.add(name)
        if len(name.encode()) <= 255:  # a directory a VM of that name would live in
            (runtime / name).mkdir()
    seen = set(scan_vms(Config.model_validate({"service": {"runtime_dir": str(runtime)}})))
    assert accepted == seen
    assert "v" * VM_NAME_MAX in seen and "v" * (VM_NAME_MAX + 1) not in seen


def test_an_oops_on_the_console_is_a_crash(tmp_path: Path) -> None:
    spec = vmlab.VMSpec(name="c", image=_image(tmp_path), runtime_dir=tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "console.log").write_text(OOPS_CONSOLE)
    vm = vmlab.VirtualMachine(spec, pid=-1, accel="tcg")
    with pytest.raises(vmlab.GuestCrashed, match="Oops") as info:
        vm.check_crash()
    assert any("sched_clock_cpu" in line for line in info.value.lines)


#: The console of the CI boot that hung (2026-12-01): the kernel's lost-timer report.
HUNG_CONSOLE = """\
[  276.178517] rcu: rcu_preempt kthread timer wakeup didn't happen for 5251 jiffies! g-1119 f0x0
[  276.184634] rcu: \tPossible timer handling issue on cpu=1 timer-softirq=7
"""


class _NeverReady(vmlab.VirtualMachine):
    """Stand-in for a booting guest whose login never comes (a lost TCG timer cannot be
    caused on demand): each wait times out at once."""

    def wait_for(self, pattern: str, deadline_s: float, what: str | None = None) -> re.Match[str]:
        raise vmlab.WaitTimeout(f"no {what} within {deadline_s:.0f} s")


def _never_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console: str) -> _NeverReady:
    """A booting guest whose console so far is ``console``, with no hang grace."""
    monkeypatch.setattr(machine, "HANG_GRACE_S", 0.0)
    monkeypatch.setattr(machine, "_HANG_POLL_S", 0.01)
    spec = vmlab.VMSpec(name="h", image=_image(tmp_path), runtime_dir=tmp_path)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "console.log").write_text(console)
    return _NeverReady(spec, pid=-1, accel="tcg")


@pytest.mark.parametrize(
    ("console", "raised"),
    [(HUNG_CONSOLE, vmlab.GuestHung), ("[ 1.0] booting\n", vmlab.WaitTimeout)],
)
def test_a_boot_that_reports_a_lost_timer_is_hung_after_a_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console: str, raised: type[Exception]
) -> None:
    """A boot whose kernel reported a lost timer is GuestHung (which start() retries) once
    HANG_GRACE_S passed; without that report, the same wait is an ordinary timeout."""
    vm = _never_ready(tmp_path, monkeypatch, console)
    with pytest.raises(raised) as info:
        vm.wait_booted(0.5)
    if raised is vmlab.GuestHung:
        assert isinstance(info.value, vmlab.GuestHung)
        assert any("timer-softirq=7" in line for line in info.value.lines)
    else:
        assert "userspace not up" in str(info.value) and "booting" in str(info.value)


def test_a_lost_timer_reported_before_a_reboot_is_not_the_new_boots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reboot's wait (``console_from``: the console mark before it) looks for the report
    only in what the new boot printed: the last boot's is history, not a hang."""
    vm = _never_ready(tmp_path, monkeypatch, HUNG_CONSOLE)
    mark = vm.console_mark()
    with vm.console_log.open("a") as console:
        console.write("[ 0.000000] Linux version 6.12\n")
    with pytest.raises(vmlab.WaitTimeout):
        vm.wait_booted(0.3, console_from=mark)
    with pytest.raises(vmlab.GuestHung):
        vm.wait_booted(0.3)


#: qemu.log of the faults VM that died during a guest reboot (2026-12-01, this machine).
QEMU_ABORT_LOG = (
    "qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: "
    "Assertion `section_index < d->map.sections_nb' failed.\n"
)


@pytest.mark.parametrize(("qemu_log", "aborted"), [(QEMU_ABORT_LOG, True), ("", False)])
def test_a_qemu_gone_on_its_own_assertion_is_qemu_aborted(
    tmp_path: Path, qemu_log: str, aborted: bool
) -> None:
    """QEMU's own failed assertion is QemuAborted (start() retries it, the fault matrix runs
    the cell again); any other exit stays a BootError. Both carry qemu.log."""
    spec = vmlab.VMSpec(name="q", image=_image(tmp_path), runtime_dir=tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "qemu.log").write_text(qemu_log)
    err = vmlab.VirtualMachine(spec, pid=-1, accel="tcg").exited("while booting")
    assert isinstance(err, vmlab.BootError)
    assert isinstance(err, vmlab.QemuAborted) is aborted
    assert "exited while booting" in str(err) and qemu_log.strip() in str(err)


def test_stop_of_an_unknown_vm_says_so(tmp_path: Path) -> None:
    with pytest.raises(vmlab.VMNotFound):
        vmlab.stop("nope", tmp_path)


def test_cli_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["vm", "--runtime-dir", str(tmp_path), "start", "x", "--image", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "pvctl vm: image directory" in err and "lacks rootfs.img" in err and "hint:" in err


def test_cli_names_the_vm_name_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "v" * (VM_NAME_MAX + 1)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["vm", "--runtime-dir", str(tmp_path), "start", name, "--image", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"invalid VM name '{name}'" in err and "build-image" not in err


def test_vms_get_a_balloon_device_unless_told_not_to(tmp_path: Path) -> None:
    spec = vmlab.VMSpec(name="t", image=_image(tmp_path), runtime_dir=tmp_path)
    assert "virtio-balloon-pci,id=balloon0" in vmlab.qemu_argv(spec, [])
    spec = vmlab.VMSpec(name="t", image=_image(tmp_path), runtime_dir=tmp_path, balloon=False)
    assert "virtio-balloon-pci,id=balloon0" not in vmlab.qemu_argv(spec, [])


def test_a_nice_value_outside_setpriority_range_is_refused_with_the_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ("20", "-21"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["vm", "--runtime-dir", str(tmp_path), "start", "x",
                      "--image", str(_image(tmp_path)), "--nice", bad])  # fmt: skip
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert f"nice {bad} is outside -20..19" in err, err
    assert not (tmp_path / "x").exists(), "nothing was started"
