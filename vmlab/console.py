"""The interactive serial console: the terminal, raw, wired to a VM's ``console.sock``."""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import tty
from pathlib import Path

from vmlab.errors import VMNotFound

__all__ = ["DETACH_KEY", "attach_console"]

#: Ctrl-] detaches, as in telnet and ``virsh console``.
DETACH_KEY = b"\x1d"


def attach_console(name: str, runtime_dir: Path) -> None:
    """Copy bytes both ways until the VM hangs up or the user presses Ctrl-]."""
    path = runtime_dir / name / "console.sock"
    if not path.exists():
        raise VMNotFound(f"no console for VM {name} ({path} is missing)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
        print(f"[connected to {name}'s console; Ctrl-] detaches]", file=sys.stderr)
        try:
            if saved is not None:
                tty.setraw(fd)
            while True:
                ready, _, _ = select.select([s, fd], [], [])
                if s in ready:
                    data = s.recv(4096)
                    if not data:
                        break
                    os.write(sys.stdout.fileno(), data)
                if fd in ready:
                    data = os.read(fd, 1024)
                    if not data or DETACH_KEY in data:
                        break
                    s.sendall(data)
        finally:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
