"""A private libvirtd for tests and benchmarks, and the test image as a libvirt domain.

:class:`Libvirtd` runs the monolithic ``libvirtd`` (no systemd needed) with its own config and
its sockets in a directory of ours, reached as ``qemu:///system?socket=<dir>/libvirt-sock``;
the QEMU driver needs ``virtlogd``, which is started too unless one already serves this host.
Both are stopped by :meth:`Libvirtd.stop`, which also removes the empty ``machine`` cgroups
libvirt made meanwhile. libvirtd runs in a mount namespace of its own, where its
``/etc/libvirt/qemu.conf`` is ours (QEMU as root): see :data:`QEMU_CONF`.
:func:`domain_xml` is the lab's VM (``vmlab.qemu``) as a domain: TCG,
direct kernel boot of the test image, the extpv channel, and optionally the test hook's channel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from vmlab.errors import LauncherError as VmError
from vmlab.qemu import AGENT_PORT_NAME, KERNEL_CMDLINE, TEST_PORT_NAME

__all__ = ["Libvirtd", "domain_xml"]

VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
SYSTEM_QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: The QEMU driver's settings of our libvirtd: QEMU runs as root, as the domains of the lab do.
#: Under the packaged default (QEMU as libvirt-qemu), a host whose ``/dev/kvm`` only root may
#: open (no udev: 0600 root) makes libvirt find KVM when it probes QEMU and "not available
#: now" when it checks that probe, so it threw its capability cache away and probed again (4 s)
#: at every lookup: ``virsh define`` + ``start`` took 84-190 s instead of seconds.
QEMU_CONF = 'user = "root"\ngroup = "root"\n'
CGROUPS = Path("/sys/fs/cgroup")


def _machine_cgroups() -> set[Path]:
    """The ``machine`` cgroups libvirt makes (one per v1 controller, and v2's)."""
    return {p for p in CGROUPS.glob("*/machine") if p.is_dir()} | {
        p for p in CGROUPS.glob("machine") if p.is_dir()
    }


class Libvirtd:
    """``libvirtd`` (and ``virtlogd`` if none runs) serving sockets under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sockets = workdir / "sock"
        self.uri = f"qemu:///system?socket={self.sockets / 'libvirt-sock'}"
        self.log = workdir / "libvirtd.log"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._libvirtd: subprocess.Popen[bytes] | None = None
        self._machine_before = _machine_cgroups()

    def start(self, deadline_s: float = 30.0) -> None:
        self.sockets.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.sockets}"\n'
            'unix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'log_outputs = "2:stderr"\n'
        )
        (self.workdir / "qemu.conf").write_text(QEMU_CONF)
        if not VIRTLOGD_SOCKET.exists():
            self._spawn(["virtlogd", "-p", str(self.workdir / "virtlogd.pid")], "virtlogd.log")
        self.start_daemon(deadline_s)

    def start_daemon(self, deadline_s: float = 30.0) -> None:
        """(Re)start libvirtd alone (a test restarts it while domains run)."""
        sock = self.sockets / "libvirt-sock"
        sock.unlink(missing_ok=True)
        if not SYSTEM_QEMU_CONF.is_file():
            raise VmError(f"{SYSTEM_QEMU_CONF} is missing: install libvirt-daemon-system")
        # libvirtd reads qemu.conf from one fixed path: ours is bound over it in a mount
        # namespace of libvirtd's own (private: the host's file stays as it is). unshare and
        # sh exec, so the process is libvirtd itself.
        libvirtd = [
            "libvirtd",
            "--config",
            str(self.workdir / "libvirtd.conf"),
            "--pid-file",
            str(self.workdir / "libvirtd.pid"),
        ]
        bind = 'mount --bind "$0" "$1" && shift && exec "$@"'
        wrapper = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", bind]
        proc = self._spawn(
            [*wrapper, str(self.workdir / "qemu.conf"), str(SYSTEM_QEMU_CONF), *libvirtd],
            "libvirtd.log",
        )
        self._libvirtd = proc
        end = time.monotonic() + deadline_s
        while not sock.exists() or self.virsh("version", check=False).returncode != 0:
            if proc.poll() is not None:
                raise VmError(f"libvirtd exited (rc {proc.returncode}):\n{self.tail()}")
            if time.monotonic() > end:
                raise VmError(f"libvirtd did not answer within {deadline_s} s:\n{self.tail()}")
            time.sleep(0.1)

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self._procs.append(proc)
        return proc

    def stop_daemon(self) -> None:
        """Stop libvirtd (SIGTERM); its domains' QEMUs keep running."""
        proc, self._libvirtd = self._libvirtd, None
        if proc is not None:
            _terminate(proc)
            self._procs.remove(proc)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _terminate(proc)
        self._procs.clear()
        for made in _machine_cgroups() - self._machine_before:
            with contextlib.suppress(OSError):  # still in use (not ours): left alone
                made.rmdir()

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise VmError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def domain_xml(
    name: str,
    image: Path,
    vm_dir: Path,
    *,
    vcpus: int = 2,
    max_vcpus: int | None = None,
    memory_mib: int = 1024,
    agent_channel: bool = True,
    test_hook: bool = False,
    run_as_root: bool = True,
) -> str:
    """The test image as a TCG domain with direct kernel boot; sockets and console in ``vm_dir``.

    The root disk is the image itself behind QEMU's ``-snapshot`` (writes go to a temporary
    overlay, as in the lab). ``run_as_root`` runs QEMU as root without relabelling (the lab's
    image stays owned as it is); an operator's domain drops that for libvirt's own user.
    """
    img = image.resolve()
    cmdline = KERNEL_CMDLINE + (" extpv.testhook=1" if test_hook else "")
    current = f" current='{vcpus}'" if max_vcpus else ""
    channels = ""
    for wanted, sock, port in (
        (agent_channel, "agent.sock", AGENT_PORT_NAME),
        (test_hook, "test.sock", TEST_PORT_NAME),
    ):
        if wanted:
            path = quoteattr(str(vm_dir / sock))
            channels += (
                f"<channel type='unix'><source mode='bind' path={path}/>"
                f"<target type='virtio' name='{port}'/></channel>\n"
            )
    seclabel = (
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
        if run_as_root
        else ""
    )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu placement='static'{current}>{max_vcpus or vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(img / "vmlinuz"))}</kernel>
    <initrd>{escape(str(img / "initrd.img"))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(img / "rootfs.img"))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='virtio-serial' index='0'/>
    {channels}
    <serial type='file'><source path={quoteattr(str(vm_dir / "console.log"))}/></serial>
    <memballoon model='none'/>
  </devices>
  {seclabel}
  <qemu:commandline><qemu:arg value='-snapshot'/></qemu:commandline>
</domain>
"""
