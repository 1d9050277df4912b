"""How one VM is started: its :class:`VMSpec` and the QEMU command line built from it.

A VM named ``NAME`` lives in ``<runtime_dir>/NAME/`` (default ``/run/extpv/vms/NAME/``), which
is where pvhost discovers it (docs/interfaces.md):

``qmp.sock``            QMP for pvhost (QEMU serves one client per monitor)
``launcher-qmp.sock``   the lab's own QMP monitor (``quit``, ``query-cpus-fast``, hot-plug)
``agent.sock``          virtio-serial port ``org.extpv.agent.0`` (QEMU serves, pvhost connects)
``console.sock``        the serial console (interactive: ``pvctl vm console NAME``)
``console.log``         everything the serial console printed, from the first kernel line
``qemu.pid``, ``vm.json``, ``qemu.log``   QEMU's pid, how it was started, its own stderr
``test.sock``           only with ``test_hook=True``: port ``org.extpv.test.0`` served in test
                        images by the guest's command hook (see images/rootfs/extpv-testhook)

With ``ssh_port`` the VM gets one NIC (QEMU user networking, ``restrict=on``: the guest reaches
nothing, not even the host) and ``127.0.0.1:ssh_port`` on the host forwards to its port 22: how
an Ansible inventory reaches a guest that has no test hook (images/build-stock-image).

An *empty machine* (``image=None``, :meth:`VMSpec.empty`) boots nothing: QEMU starts paused
(``-S``) with real vCPU threads, the two monitors and the agent port, whose QEMU end is
``qemu-agent.sock``; ``agent.sock`` is left to a test that plays the guest agent there (with no
guest OS nothing could answer on the virtio side). That is all pvhost needs to pin threads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from extpv.names import check_vm_name
from vmlab.errors import ImageError, LauncherError, VMNameError
from vmlab.kvm import QEMU, choose_accel

__all__ = [
    "AGENT_PORT_ID",
    "AGENT_PORT_NAME",
    "DEFAULT_RUNTIME_DIR",
    "KERNEL_CMDLINE",
    "NICE_MAX",
    "NICE_MIN",
    "TEST_PORT_NAME",
    "VMSpec",
    "accel_for",
    "check_image",
    "qemu_argv",
]

DEFAULT_RUNTIME_DIR = Path("/run/extpv/vms")
AGENT_PORT_NAME = "org.extpv.agent.0"
#: The agent port's device id: QEMU reports the guest opening and closing a port
#: (``VSERPORT_CHANGE``) only for a device with an id; also what ``device_del`` names.
AGENT_PORT_ID = "pvport0"
TEST_PORT_NAME = "org.extpv.test.0"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1"
IMAGE_FILES = ("rootfs.img", "vmlinuz", "initrd.img")
#: An empty machine runs no guest code: TCG costs nothing there, needs no KVM probe, and the
#: default CPU model keeps hot-plug's driver name (``qemu64-x86_64-cpu``) stable.
EMPTY_ACCEL_ARGS = ("-accel", "tcg,thread=multi")
#: setpriority(2)'s range.
NICE_MIN, NICE_MAX = -20, 19


@dataclasses.dataclass(frozen=True)
class VMSpec:
    """How to start one VM; ``image=None`` is an empty, paused machine (see the module doc)."""

    name: str
    image: Path | None
    smp: int = 2
    #: Hot-plug room: ``-smp smp,maxcpus=N`` (vCPUs added with QMP ``device_add``).
    maxcpus: int | None = None
    memory_mib: int = 1024
    runtime_dir: Path = DEFAULT_RUNTIME_DIR
    #: ``(host_path, mount_tag)`` shared with the guest over 9p.
    virtfs: tuple[tuple[Path, str], ...] = ()
    #: Serve the guest's test hook on ``test.sock`` (test images only).
    test_hook: bool = False
    #: A virtio-balloon device (``balloon0``) for the memory service (also on an empty machine:
    #: QEMU takes balloon commands without a guest driver, which the storm test uses).
    balloon: bool = True
    #: Forward ``127.0.0.1:ssh_port`` on the host to the guest's port 22 (its only network).
    ssh_port: int | None = None
    #: ``auto`` probes KVM and falls back to TCG (an empty machine is always TCG).
    accel: str = "auto"
    extra_cmdline: str = ""
    qemu: str = QEMU
    #: An empty machine that runs this boot-sector code (vmlab.bootsector) instead of
    #: waiting paused: vCPU 0 executes it from the moment QEMU starts.
    boot_code: bytes | None = None
    #: QEMU's nice value, for every one of its threads (None: the launcher's own). The VM
    #: manager's priority for the guest against other host load: docs/vm-priority.md.
    nice: int | None = None

    def __post_init__(self) -> None:
        # The one rule pvhost applies too: a VM it would ignore is never started.
        try:
            check_vm_name(self.name)
        except ValueError as err:
            raise VMNameError(str(err)) from err
        if self.image is None and (
            self.test_hook or self.virtfs or self.extra_cmdline or self.ssh_port is not None
        ):
            raise LauncherError(
                f"VM {self.name}: an empty machine (no image) runs no guest, so it takes no "
                "test hook, virtfs, SSH port or kernel command line; give it an image"
            )
        if self.ssh_port is not None and not 0 < self.ssh_port < 65536:
            raise LauncherError(f"VM {self.name}: ssh_port {self.ssh_port} is not a TCP port")
        if self.nice is not None and not NICE_MIN <= self.nice <= NICE_MAX:
            raise LauncherError(
                f"VM {self.name}: nice {self.nice} is outside {NICE_MIN}..{NICE_MAX} "
                "(lower runs first; below 0 needs root or CAP_SYS_NICE)"
            )
        if self.image is not None and self.boot_code is not None:
            raise LauncherError(
                f"VM {self.name}: boot_code is for an empty machine; an image boots its kernel"
            )

    @classmethod
    def empty(
        cls,
        name: str,
        runtime_dir: Path,
        smp: int = 3,
        maxcpus: int | None = None,
        boot_code: bytes | None = None,
    ) -> VMSpec:
        """An empty machine with ``smp`` real vCPU threads and 64 MiB: paused, or running
        ``boot_code`` (see :mod:`vmlab.bootsector`)."""
        return cls(
            name=name, image=None, smp=smp, maxcpus=maxcpus, memory_mib=64,
            runtime_dir=runtime_dir, boot_code=boot_code,
        )  # fmt: skip

    @property
    def vm_dir(self) -> Path:
        return self.runtime_dir / self.name


def check_image(image: Path) -> None:
    """Raise ImageError naming the files a bootable image directory lacks."""
    missing = [f for f in IMAGE_FILES if not (image / f).is_file()]
    if missing:
        raise ImageError(
            f"image directory {image} lacks {', '.join(missing)}; "
            "build one with: sudo images/build-image --out images/out"
        )


def accel_for(spec: VMSpec) -> tuple[str, list[str]]:
    """The accelerator for ``spec`` and its QEMU arguments (probes KVM for ``auto``)."""
    if spec.image is None:
        return "tcg", list(EMPTY_ACCEL_ARGS)
    return choose_accel(spec.accel, spec.qemu)


def _boot_args(spec: VMSpec, image: Path) -> list[str]:
    """Kernel, root disk and serial console of a VM that boots ``image``."""
    d, img = spec.vm_dir, image.resolve()
    cmdline = KERNEL_CMDLINE + (" extpv.testhook=1" if spec.test_hook else "")
    cmdline += f" {spec.extra_cmdline}" if spec.extra_cmdline else ""
    return [
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"), "-append", cmdline,
        # The image stays pristine: writes go to a temporary overlay dropped at exit.
        "-drive", f"file={img / 'rootfs.img'},if=virtio,format=raw,snapshot=on",
        # Serial console: logged from the first byte even while nobody is attached.
        "-chardev", f"socket,id=con0,path={d / 'console.sock'},server=on,wait=off,"
                    f"logfile={d / 'console.log'},logappend=on",
        "-serial", "chardev:con0",
    ]  # fmt: skip


#: Where an empty machine's boot disk is written (in its VM directory).
BOOT_DISK = "boot.img"


def _start_args(spec: VMSpec) -> list[str]:
    """How the machine starts: boot the image, run the boot-sector disk, or wait paused."""
    if spec.image is not None:
        return _boot_args(spec, spec.image)
    if spec.boot_code is not None:
        disk = spec.vm_dir / BOOT_DISK
        return ["-drive", f"file={disk},format=raw,if=none,id=boot0",
                "-device", "ide-hd,drive=boot0,bus=ide.0"]  # fmt: skip
    return ["-S"]


def qemu_argv(spec: VMSpec, accel_args: Sequence[str] | None = None) -> list[str]:
    """The QEMU command line for ``spec`` (docs/guest-images.md shows it, libvirt included)."""
    d = spec.vm_dir
    if accel_args is None:
        accel_args = accel_for(spec)[1]
    smp = str(spec.smp) if spec.maxcpus is None else f"{spec.smp},maxcpus={spec.maxcpus}"
    # An empty machine's agent port ends in QEMU at qemu-agent.sock: agent.sock is the test's.
    agent_end = "agent.sock" if spec.image is not None else "qemu-agent.sock"
    argv = [
        spec.qemu, "-name", f"{spec.name},debug-threads=on",
        "-machine", "q35", *accel_args,
        "-smp", smp, "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none",
        *_start_args(spec),
        "-chardev", f"socket,id=qmp0,path={d / 'qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=qmp1,path={d / 'launcher-qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp1,mode=control",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=pv0,path={d / agent_end},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=pv0,name={AGENT_PORT_NAME},"
                   f"id={AGENT_PORT_ID}",
        "-pidfile", str(d / "qemu.pid"),
    ]  # fmt: skip
    if spec.balloon:
        argv += ["-device", "virtio-balloon-pci,id=balloon0"]
    if spec.test_hook:
        argv += [
            "-chardev", f"socket,id=test0,path={d / 'test.sock'},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=test0,name={TEST_PORT_NAME}",
        ]  # fmt: skip
    if spec.ssh_port is not None:
        argv += [
            "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
        ]  # fmt: skip
    for i, (path, tag) in enumerate(spec.virtfs):
        argv += [
            "-virtfs",
            f"local,path={Path(path).resolve()},mount_tag={tag},security_model=none,id=fs{i}",
        ]
    return argv
