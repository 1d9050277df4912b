"""pvhost.launcher without booting anything: command line, image checks, crash detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvhost import launcher

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
    spec = launcher.VMSpec(name="db1", image=_image(tmp_path), smp=3, memory_mib=512,
                           runtime_dir=tmp_path / "vms")  # fmt: skip
    argv = launcher.qemu_argv(spec, ["-accel", "tcg,thread=multi", "-cpu", "max"])
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
    spec = launcher.VMSpec(name="t", image=_image(tmp_path), runtime_dir=tmp_path, test_hook=True)
    line = " ".join(launcher.qemu_argv(spec, []))
    assert "extpv.testhook=1" in line and "name=org.extpv.test.0" in line


def test_missing_image_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"x")
    spec = launcher.VMSpec(name="x", image=tmp_path, runtime_dir=tmp_path / "vms")
    with pytest.raises(launcher.ImageError, match=r"lacks rootfs\.img, initrd\.img.*build-image"):
        launcher.start(spec)


def test_bad_vm_name_is_refused(tmp_path: Path) -> None:
    spec = launcher.VMSpec(name="../etc", image=_image(tmp_path), runtime_dir=tmp_path / "vms")
    with pytest.raises(launcher.ImageError, match="bad VM name"):
        launcher.start(spec)


def test_an_oops_on_the_console_is_a_crash(tmp_path: Path) -> None:
    spec = launcher.VMSpec(name="c", image=_image(tmp_path), runtime_dir=tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "console.log").write_text(OOPS_CONSOLE)
    vm = launcher.VirtualMachine(spec, pid=-1, accel="tcg")
    with pytest.raises(launcher.GuestCrashed, match="Oops") as info:
        vm.check_crash()
    assert any("sched_clock_cpu" in line for line in info.value.lines)


def test_stop_of_an_unknown_vm_says_so(tmp_path: Path) -> None:
    with pytest.raises(launcher.VMNotFound):
        launcher.stop("nope", tmp_path)


def test_cli_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = launcher.main(
        ["vm", "--runtime-dir", str(tmp_path), "start", "x", "--image", str(tmp_path)]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "lacks rootfs.img" in err and "hint:" in err
