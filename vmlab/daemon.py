"""The real pvhost daemon as a subprocess, for tests and benchmarks that boot real VMs.

``pvhost run`` (this environment's pvhost, started as ``python -m pvhost.cli``) watches a
private runtime directory with its own state directory, control socket and cpuset group, so it
sees only the lab's VMs. A caller may kill it (-9) and start it again: its state directory
survives, as on a real host. Every wait names what it waits for and has a deadline. The lab
never imports pvhost: it talks to the daemon as an operator does, through ``pvctl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmlab.errors import DaemonError
from vmlab.images import CHECKOUT

__all__ = ["PvhostDaemon"]

CPUSET_V1 = Path("/sys/fs/cgroup/cpuset")
#: The affinity program this checkout's agent wheel (and so the test image) was built with.
CHECKOUT_AFFINITY_PROGRAM = CHECKOUT / "extpv" / "bpfobj" / "affinity.bpf.o"


class PvhostDaemon:
    """``pvhost run`` on this host, watching ``runtime_dir`` (identity policy, quota 4).

    ``affinity_program`` defaults to this checkout's built object when there is one (else
    pvhost's own default); the daemon runs in ``cwd``, by default this checkout.
    ``keepalive`` (Ping interval, silence deadline) replaces pvhost's default;
    ``extra_config`` is appended to the file (e.g. a ``[libvirt]`` section).
    """

    def __init__(
        self,
        workdir: Path,
        runtime_dir: Path,
        signing_key: Path,
        *,
        affinity_program: Path | None = None,
        group: str | None = None,
        cwd: Path | None = None,
        keepalive: tuple[float, float] | None = None,
        extra_config: str = "",
        verbose: bool = False,
        nice: int | None = None,
    ) -> None:
        self.workdir = workdir
        #: pvhost's ``state_dir`` (a bench may mount a tmpfs here before :meth:`start`).
        self.state_dir = workdir / "state"
        self.socket = workdir / "pvhost.sock"
        self.log = workdir / "pvhost.log"
        self.group = group or f"extpv-e2e-{os.getpid()}"
        self.cwd = cwd or CHECKOUT
        if affinity_program is None and CHECKOUT_AFFINITY_PROGRAM.exists():
            affinity_program = CHECKOUT_AFFINITY_PROGRAM
        self.config = workdir / "pvhost.toml"
        self.config.write_text(
            f'[service]\nruntime_dir = "{runtime_dir}"\nstate_dir = "{self.state_dir}"\n'
            f'control_socket = "{self.socket}"\nmetrics = ""\nsigning_key = "{signing_key}"\n'
            "max_backoff = 0.5\n"
            + (f"nice = {nice}\n" if nice is not None else "")
            + (
                f"keepalive_interval = {keepalive[0]}\nkeepalive_deadline = {keepalive[1]}\n"
                if keepalive
                else ""
            )
            # Named explicitly: the object the guest image's agent was built with.
            + (f'affinity_program = "{affinity_program}"\n' if affinity_program else "")
            + "\n"
            f'[placement]\nbackend = "auto"\ngroup = "{self.group}"\nhousekeeping = ""\n'
            'policy = "identity"\nquota = 4\nrate = 1000.0\nburst = 1000\n' + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None
        #: ``pvhost run -v``: debug lines (e.g. each change's stages) in the log too.
        self.verbose = verbose
        #: ``[service] nice``, and pvhost in a session of its own, as a service runs: it then
        #: sets its threads and (where autogroup is on) its session group to the value
        #: (pvhost.daemon.set_priority). None: pvhost's default value, in the caller's session.
        self.nice = nice

    def start(self, deadline_s: float = 30.0) -> None:
        """Start ``pvhost run`` and wait for its control socket."""
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pvhost.cli", "run", "--config", str(self.config)]
                + (["-v"] if self.verbose else []),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.cwd,
                start_new_session=self.nice is not None,
            )
        end = time.monotonic() + deadline_s
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise DaemonError(
                    f"pvhost exited at start (rc {self.proc.returncode}):\n{self.tail()}"
                )
            if time.monotonic() > end:
                raise DaemonError(
                    f"pvhost made no control socket within {deadline_s} s:\n{self.tail()}"
                )
            time.sleep(0.05)

    def kill(self, sig: int) -> None:
        """Send ``sig`` and wait for the daemon to exit."""
        assert self.proc is not None, "pvhost was never started"
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Stop the daemon if it runs, and leave this host as found.

        pvhost removes its own cpuset group at exit; an empty one left behind (e.g. after a
        kill -9) is removed here, a non-empty one is left for the caller to report.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        leftover = CPUSET_V1 / self.group
        if leftover.is_dir() and not any(p.is_dir() for p in leftover.iterdir()):
            leftover.rmdir()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        """``pvctl status --json``."""
        proc = subprocess.run(
            [sys.executable, "-m", "pvhost.ctl", "--socket", str(self.socket), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.cwd,
            check=False,
        )
        if proc.returncode != 0:
            raise DaemonError(f"pvctl status failed: {proc.stdout}{proc.stderr}\n{self.tail()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def wait_status(
        self, what: str, pred: Callable[[dict[str, Any]], bool], deadline_s: float = 120.0
    ) -> dict[str, Any]:
        """Poll ``pvctl status --json`` until ``pred(status)``; DaemonError naming ``what``."""
        end = time.monotonic() + deadline_s
        while True:
            st = self.status()
            try:
                if pred(st):
                    return st
            except (KeyError, TypeError, IndexError):
                pass  # the VM is not (fully) in the status yet
            if time.monotonic() > end:
                raise DaemonError(
                    f"pvhost: no {what} within {deadline_s:.0f} s; status:\n"
                    f"{json.dumps(st, indent=1)[-3000:]}\npvhost log:\n{self.tail()}"
                )
            time.sleep(0.2)
