"""Client of a test image's command hook: JSON lines over the ``org.extpv.test.0`` port.

Test images (``images/build-image --with-tests``) run ``extpv-testhook`` in the guest when the
kernel command line says ``extpv.testhook=1``; QEMU serves its port on ``test.sock``. Each
request carries an ``id`` and the answer echoes it, so answers to requests the guest read late
(sent while it was still booting) are told apart and dropped.
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmlab.errors import GuestCommandError, WaitTimeout

__all__ = ["GuestResult", "TestHook"]


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What a guest command did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> GuestResult:
        if self.returncode != 0:
            err = self.stderr.strip()[-2000:]
            raise GuestCommandError(f"guest command {self.argv!r} exited {self.returncode}: {err}")
        return self


class TestHook:
    """One connection to a VM's ``test.sock`` (reconnected after QEMU resets it)."""

    __test__ = False  # a client, not a pytest test class

    def __init__(self, path: Path, vm: str) -> None:
        self.path, self.vm = path, vm
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
            except OSError as err:
                s.close()
                raise GuestCommandError(f"{self.vm}: cannot connect to {self.path}: {err}") from err
            self._sock, self._buf = s, b""
        return self._sock

    def _request(self, req: dict[str, Any], deadline_s: float) -> dict[str, Any]:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            s = self._connect()
            try:
                s.sendall(json.dumps({"id": rid, **req}).encode() + b"\n")
            except OSError as err:
                self.close()
                raise GuestCommandError(f"{self.vm}: test hook socket: {err}") from err
            end = time.monotonic() + deadline_s
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("id") == rid:
                        return msg
                left = end - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(
                        f"{self.vm}: no answer from the guest test hook to {req!r} "
                        f"within {deadline_s:.0f} s"
                    )
                ready, _, _ = select.select([s], [], [], min(left, 1.0))
                if ready:
                    try:
                        chunk = s.recv(65536)
                    except OSError as err:
                        # QEMU resets the chardev connection while the guest opens its port
                        # (seen during boot): the same as a close, the caller reconnects.
                        self.close()
                        raise GuestCommandError(f"{self.vm}: test hook socket: {err}") from err
                    if not chunk:
                        self.close()
                        raise GuestCommandError(f"{self.vm}: test hook socket closed by QEMU")
                    self._buf += chunk

    def run(self, argv: Sequence[str] | str, timeout_s: float, input_text: str) -> GuestResult:
        """Run a command in the guest (a list: argv; a string: ``sh -c``) and wait for it."""
        req: dict[str, Any] = {"timeout": timeout_s, "input": input_text}
        if isinstance(argv, str):
            req["sh"], shown = argv, ["sh", "-c", argv]
        else:
            req["argv"], shown = list(argv), list(argv)
        msg = self._request(req, timeout_s + 15.0)
        if "error" in msg:
            raise GuestCommandError(f"{self.vm}: guest could not run {shown!r}: {msg['error']}")
        return GuestResult(shown, int(msg["rc"]), str(msg["stdout"]), str(msg["stderr"]))

    def background(self, argv: Sequence[str], log_path: str, deadline_s: float) -> int:
        """Start a command in the guest without waiting for it; its guest pid."""
        msg = self._request({"argv": list(argv), "background": True, "log": log_path}, deadline_s)
        if "error" in msg:
            raise GuestCommandError(f"{self.vm}: guest could not start {argv!r}: {msg['error']}")
        return int(msg["pid"])

    def clock_offset(self, samples: int) -> tuple[float, float]:
        """Guest minus host CLOCK_REALTIME and its error bound, from the fastest round trip."""
        best: tuple[float, float] | None = None
        for _ in range(samples):
            t0 = time.time()
            msg = self._request({"clock": True}, 10.0)
            t1 = time.time()
            if "time" not in msg:
                raise GuestCommandError(f"{self.vm}: the guest test hook has no clock request")
            rtt = t1 - t0
            if best is None or rtt < 2 * best[1]:
                best = (float(msg["time"]) - (t0 + t1) / 2, rtt / 2)
        assert best is not None
        return best

    def ping(self, deadline_s: float) -> None:
        """Raise WaitTimeout or GuestCommandError unless the hook runs ``true`` in time."""
        self._request({"argv": ["true"], "timeout": 5}, deadline_s)
