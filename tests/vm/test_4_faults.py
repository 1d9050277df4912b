"""The fault matrix (issue #13): every fault at every phase of the channel, on real parts.

Each cell injects one fault at one phase into the image VM ``faults`` (lab: tests/vm/faultlab.py)
and then asserts, within ``RECOVER_S`` = 10 s after the fault is released, or, where the fault
makes the guest start a new agent (``NEW_AGENT``, a reboot, a new QEMU), within 10 s of that
agent's Hello, the boot and the agent's own start-up measured and reported apart (its Python
start-up under TCG is the guest's: 5-9 s in a running guest and up to 20 s in a booting one on a
slow 2-CPU host; the whole is bounded by 10 s + the boot + ``AGENT_START_S`` = 30 s):

* the affinity program is loaded again (the agent acked it) and the session is ready;
* the placement equals the guest's current wish (vCPU 1 → pCPU 1 while its pinned thread
  lives; nothing after a reboot or a new QEMU), checked in the host kernel too;
* no cgroup and no pvhost state is left for a VM or a QEMU that is gone;
* the bystander VM was served throughout: its pin holds, it is answered, and its session
  never reset (unless pvhost itself was restarted: then it is served again in time);
* where the fault leaves the guest's agent alone (``AGENT_LIVES``: a silent agent, a pvhost
  restart, a port replug), the agent is the same process after it: it did not crash.

How each phase is made to happen, deterministically (pvhost's keepalive in the lab: Ping every
1 s, deadline 4 s; every fault is injected within the deadline):

============== ==================================================================================
phase          how the cell gets there
============== ==================================================================================
before-hello   pvhost is SIGSTOPped and the agent's port unplugged and plugged again (QMP): the
               agent opens it anew and its Hello waits unread in pvhost's socket while the agent
               waits for pvhost's; then the fault; then SIGCONT.
program-load   the agent is SIGSTOPped and ``pvctl program load`` sent: pvhost shows the program
               ``loading``, no ack can come; then the fault; then SIGCONT (if the agent lives).
pin-applying   pvhost is SIGSTOPped and the guest pins a thread: the AffinityUpdate waits unread
               in pvhost's socket; then the fault; then SIGCONT.
pinned         the thread's pin is placed (vCPU 1 on pCPU 1); then the fault.
============== ==================================================================================

================ ================================================================================
fault            how it is injected (all 9 x 4 cells run; none is impossible)
================ ================================================================================
agent-restart    ``systemctl restart pvagent`` in the guest
agent-kill       ``systemctl kill -s KILL pvagent``; systemd starts a new agent after 2 s
                 (``RestartSec``), and the cell counts from that start, as agent-restart's
pvhost-restart   SIGTERM to pvhost (SIGCONT too if frozen), then a new ``pvhost run``
pvhost-kill      SIGKILL to pvhost, then a new ``pvhost run``
qemu-kill        SIGKILL to QEMU, then a new QEMU under the same name (a fresh boot)
guest-reboot     ``systemctl reboot`` in the guest (same QEMU)
port-replug      QMP ``device_del`` of the agent's port, then ``device_add`` of it again
port-garbage     guest root stops the agent (the port admits one opener), writes 16 KiB of
                 /dev/urandom to the port, starts the agent again
agent-silent     the agent is SIGSTOPped (program-load: it already is) until pvhost's keepalive
                 resets its session (asserted), then SIGCONT. Before Hello a stopped agent is
                 one that has not answered yet: pvhost must wait, not reset (it is stopped
                 for the deadline + 2 Pings, then SIGCONT)
================ ================================================================================

A cell whose QEMU exits on one of its own assertions (``QemuAborted``: QEMU 10.0's
multi-threaded TCG, seen here in a reboot's memory-map change) hit an emulator bug, not the
fault under test: it runs once more on a new QEMU, and a second abort fails it.

Time to recover per cell goes to ``$EXTPV_FAULTS_RESULTS/faults.{json,md}`` when that is set
(bench/results/ holds the last recorded run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from tests.vm.faultlab import AGENT_START_S, KEEPALIVE, PORT, RECOVER_S, VM, FaultLab, poll
from vmlab.errors import QemuAborted
from vmlab.images import GuestImage

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow, pytest.mark.faults]

PHASES = ("before-hello", "program-load", "pin-applying", "pinned")
FAULTS = (
    "agent-restart",
    "agent-kill",
    "port-garbage",
    "agent-silent",
    "pvhost-restart",
    "pvhost-kill",
    "guest-reboot",
    "qemu-kill",
    "port-replug",
)
CELLS = [(f, p) for f in FAULTS for p in PHASES]
#: The faults after which the guest runs a new agent process (its start-up is the guest's).
NEW_AGENT = frozenset({"agent-restart", "agent-kill", "port-garbage"})
#: The faults the guest's agent lives through: the same process before and after (one that
#: died of them would still converge, after its RestartSec and start-up, and hide the crash).
AGENT_LIVES = frozenset({"agent-silent", "pvhost-restart", "pvhost-kill", "port-replug"})


@dataclass
class Outcome:
    fault: str
    phase: str
    #: Seconds from the fault's release to convergence (boot included where there is one);
    #: None: it did not converge (the cell failed).
    recover_s: float | None
    #: The guest's boot inside that time (0: the fault boots nothing).
    boot_s: float
    #: Whether the bystander's session reset (only allowed when pvhost itself restarted).
    bystander_reset: bool
    #: Where the fault starts a new agent (NEW_AGENT, or a boot): its start-up inside that
    #: time, after the boot, until pvhost had its Hello (session ready); 0 elsewhere.
    agent_s: float = 0.0


_OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module")
def lab(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultLab]:
    root = Path("/run/extpv-test") / f"{os.getpid()}-faults"
    fault_lab = FaultLab(guest_image, root / "vms", tmp_path_factory.mktemp("pvhost-faults"))
    t0 = time.monotonic()
    try:
        fault_lab.open()
        yield fault_lab
    finally:
        fault_lab.close()
        shutil.rmtree(root, ignore_errors=True)
        _record(time.monotonic() - t0, fault_lab.boots)


def _record(total_s: float, boots: list[float]) -> None:
    out = os.environ.get("EXTPV_FAULTS_RESULTS")
    if not out or not _OUTCOMES:
        return
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs (QEMU TCG)",
        "keepalive": {"interval_s": KEEPALIVE[0], "deadline_s": KEEPALIVE[1]},
        "bound_s": RECOVER_S,
        "bound_after_boot_s": f"{RECOVER_S:g} + boot + {AGENT_START_S:g}",
        "module_wall_s": round(total_s, 1),
        "boots_s": [round(b, 1) for b in boots],
        "cells": [asdict(o) for o in _OUTCOMES],
    }
    (d / "faults.json").write_text(json.dumps(doc, indent=1) + "\n")
    rows = {(o.fault, o.phase): o for o in _OUTCOMES}
    lines = [
        "# Fault matrix: time to recover (s)",
        "",
        f"Produced by `tests/vm/test_4_faults.py` (EXTPV_FAULTS_RESULTS set) on {doc['machine']};",
        f"pvhost keepalive {KEEPALIVE[0]:g} s / {KEEPALIVE[1]:g} s. Seconds from the fault's",
        "release to convergence (program loaded, placement = the guest's wish, nothing left",
        f"of a dead VM); bound {RECOVER_S:g} s, plus the boot and {AGENT_START_S:g} s for the",
        "agent's start-up where the fault reboots the guest",
        "(boot time in brackets). Where the fault starts a new agent, its start-up until its",
        f"Hello is in square brackets and the bound is {RECOVER_S:g} s after that Hello (and",
        f"{RECOVER_S + AGENT_START_S:g} s in all); agent-kill counts from the new agent's start",
        "(the guest's systemd waits its RestartSec first). `*`: the bystander's session was",
        "restarted.",
        f"Whole module: {total_s:.0f} s wall, {len(boots)} boots.",
        "",
        "| fault | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
    ]
    for fault in FAULTS:
        cells = []
        for phase in PHASES:
            o = rows.get((fault, phase))
            if o is None:
                cells.append("not run")
                continue
            if o.recover_s is None:
                cells.append("**FAILED**")
                continue
            text = f"{o.recover_s:.1f}"
            if o.boot_s:
                text += f" ({o.boot_s:.0f})"
            elif o.agent_s:
                text += f" [{o.agent_s:.1f}]"
            cells.append(text + ("*" if o.bystander_reset else ""))
        lines.append(f"| {fault} | " + " | ".join(cells) + " |")
    (d / "faults.md").write_text("\n".join(lines) + "\n")


# -- phases ------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    pvhost_frozen: bool = False
    agent_frozen: int | None = None  # guest pid of the SIGSTOPped agent
    reboot_mark: int = 0  # guest-reboot: the console mark its boot begins after


def _enter(lab: FaultLab, name: str) -> Phase:
    if name == "before-hello":
        lab.ensure_baseline(workload=True)
        lab.freeze_pvhost()
        # A new session of the same agent: it opens the replugged port anew and says Hello.
        # (Restarting it costs its Python start-up under TCG, ~9 s, in each of 9 cells.)
        agent = lab.agent_pid()
        opened = lab.port_opens(agent)
        lab.replug_port()
        poll(
            "the agent's port open again (its Hello sent)",
            lambda: lab.port_opens(agent) > opened,
            30,
        )
        return Phase(name, pvhost_frozen=True)
    if name == "program-load":
        lab.ensure_baseline(workload=True)
        pid = lab.agent_pid()
        lab.guest(f"kill -STOP {pid}")
        lab.load_program_async()
        lab.daemon.wait_status(
            "the program loading", lambda s: s["vms"][VM]["programs"] == {"affinity": "loading"}, 10
        )
        return Phase(name, agent_frozen=pid)
    if name == "pin-applying":
        lab.ensure_baseline(workload=False)
        lab.freeze_pvhost()
        lab.start_workload()
        time.sleep(1.0)  # the agent reports a new pin within its 20 ms window
        return Phase(name, pvhost_frozen=True)
    assert name == "pinned"
    lab.ensure_baseline(workload=True)
    return Phase(name)


def _release(lab: FaultLab, phase: Phase, guest_alive: bool) -> None:
    if phase.pvhost_frozen:
        lab.thaw_pvhost()
        phase.pvhost_frozen = False
    if phase.agent_frozen is not None and guest_alive:
        lab.guest(f"kill -CONT {phase.agent_frozen} 2>/dev/null; true")
        phase.agent_frozen = None


# -- faults ------------------------------------------------------------------------------------
def _restart_pvhost(lab: FaultLab, phase: Phase, sig: signal.Signals) -> None:
    proc = lab.daemon.proc
    assert proc is not None
    proc.send_signal(sig)
    if phase.pvhost_frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        phase.pvhost_frozen = False
    proc.wait(30)
    lab.daemon.start()


def _silence(lab: FaultLab, phase: Phase) -> None:
    """SIGSTOP the agent (if not yet), let pvhost run, and see its keepalive reset the VM.

    Before Hello there is nothing to time out: the host has greeted an agent that has not
    answered yet, which is what an agent still starting looks like; it must wait (no reset
    is asserted) and converge once the agent runs again.
    """
    resets = lab.daemon.status()["vms"][VM]["resets"] if not phase.pvhost_frozen else 0
    if phase.agent_frozen is None:
        phase.agent_frozen = lab.agent_pid()
        lab.guest(f"kill -STOP {phase.agent_frozen}")
    if phase.name == "before-hello":
        lab.thaw_pvhost()
        phase.pvhost_frozen = False
        time.sleep(KEEPALIVE[1] + 2 * KEEPALIVE[0])
        return
    if phase.pvhost_frozen:
        lab.thaw_pvhost()
        phase.pvhost_frozen = False
        # It reads what waited (the guest's pin request) first: count resets after that.
        lab.daemon.wait_status("pvhost awake", lambda s: s["vms"][VM]["wanted"] == [1], 10)
        resets = lab.daemon.status()["vms"][VM]["resets"]
    lab.daemon.wait_status(
        "the keepalive's reset of the silent agent's session",
        lambda s: s["vms"][VM]["resets"] > resets,
        KEEPALIVE[1] + 3 * KEEPALIVE[0] + 5,
    )


def _inject(lab: FaultLab, fault: str, phase: Phase) -> tuple[bool, bool]:
    """Inject ``fault``; (the guest's processes survived, pvhost was restarted)."""
    if fault == "agent-restart":
        lab.guest(["systemctl", "restart", "pvagent"])
    elif fault == "agent-kill":
        old = lab.agent_pid()
        lab.guest(["systemctl", "kill", "-s", "KILL", "pvagent"])
        # The guest's service manager starts a new agent after its RestartSec (2 s): the
        # guest's policy, not extpv's recovery. The cell counts from the new agent's start,
        # as the cells whose fault starts it with systemctl (agent-restart, port-garbage).
        poll("the guest's systemd started a new agent", lambda: lab.agent_pid() not in (0, old), 60)
    elif fault == "port-garbage":
        lab.guest(
            f"systemctl stop pvagent && head -c 16384 /dev/urandom > {PORT} && "
            "systemctl start pvagent"
        )
    elif fault == "agent-silent":
        _silence(lab, phase)
    elif fault == "port-replug":
        lab.replug_port()
    elif fault == "pvhost-restart":
        _restart_pvhost(lab, phase, signal.SIGTERM)
        return True, True
    elif fault == "pvhost-kill":
        _restart_pvhost(lab, phase, signal.SIGKILL)
        return True, True
    elif fault == "guest-reboot":
        phase.reboot_mark = lab.reboot()
        return False, False
    elif fault == "qemu-kill":
        lab.guest_vm.kill()
        return False, False
    else:
        raise AssertionError(fault)
    return True, False


@pytest.mark.parametrize(("fault", "phase"), CELLS, ids=[f"{f}@{p}" for f, p in CELLS])
def test_fault_converges(lab: FaultLab, fault: str, phase: str) -> None:
    assert lab.bystander is not None
    sessions = lab.bystander.sessions
    try:
        try:
            _cell(lab, fault, phase, sessions)
        except QemuAborted as err:
            # QEMU's own assertion (its multi-threaded TCG under a starved host, seen in a
            # reboot's memory-map change): the emulator's bug, not the fault's. A new QEMU,
            # and the cell once more; a second abort fails it.
            log.warning("%s@%s: %s; again, on a new QEMU", fault, phase, err)
            lab.heal()
            _cell(lab, fault, phase, sessions)
    except BaseException:
        _OUTCOMES.append(Outcome(fault, phase, None, 0.0, lab.bystander.sessions != sessions))
        raise


def _cell(lab: FaultLab, fault: str, phase: str, sessions: tuple[int, int]) -> None:
    assert lab.bystander is not None
    state = _enter(lab, phase)
    agent = lab.agent_pid() if fault in AGENT_LIVES else 0
    injected = time.monotonic()
    try:
        guest_alive, pvhost_restarted = _inject(lab, fault, state)
    finally:
        _release(lab, state, guest_alive=fault not in ("guest-reboot", "qemu-kill"))
    # From the release; a pvhost restart is itself part of the time to recover.
    t0 = injected if pvhost_restarted else time.monotonic()
    boot_s = 0.0
    if fault == "guest-reboot":
        boot_s = lab.wait_rebooted(state.reboot_mark)
    elif fault == "qemu-kill":
        boot_s = lab.boot()
    assert guest_alive or lab.workload is None
    agent_s = 0.0
    if fault in NEW_AGENT or boot_s:
        # The fault ended the old agent's session (its port closed, or its QEMU went) before
        # the new agent started; ready again is the new agent's Hello. (Read before pvhost saw
        # the close, "ready" is the old session's: 0 s, which only makes the bound stricter.)
        agent_s = poll(
            "Hello from the new agent",
            lambda: lab.daemon.status()["vms"].get(VM, {}).get("session") == "ready",
            RECOVER_S + AGENT_START_S + 30,
        )
    recover_s, status = lab.wait_converged(
        f"convergence after {fault} at {phase}", RECOVER_S + boot_s + AGENT_START_S + 30
    )
    recover_s = time.monotonic() - t0
    if agent:
        now = lab.agent_pid()
        assert now == agent, (
            f"{fault} at {phase}: the guest's agent {agent} exited (now {now}); its journal:\n"
            + lab.guest(f"journalctl _PID={agent} -o cat --no-pager | tail -30")
        )
    lab.check_host(status)
    lab.check_bystander(sessions, pvhost_restarted)
    outcome = Outcome(
        fault,
        phase,
        round(recover_s, 1),
        round(boot_s, 1),
        lab.bystander.sessions != sessions,
        round(agent_s, 1),
    )
    _OUTCOMES.append(outcome)
    print(f"\n[faults] {outcome}", file=sys.stderr)
    bound = RECOVER_S
    if fault in NEW_AGENT or boot_s:
        # The agent's own Python start-up under TCG (3 s on one 2-CPU host, 5-9 s on a
        # slower one) is the guest's; extpv's part, after the new agent's Hello, has the
        # bound, and the whole is bounded as a booting guest's agent start is.
        extpv_s = recover_s - boot_s - agent_s
        assert extpv_s <= RECOVER_S, (
            f"{fault} at {phase}: converged {extpv_s:.1f} s after the new agent's Hello "
            f"(bound {RECOVER_S:.0f} s; the boot took {boot_s:.1f} s, the agent's start-up "
            f"{agent_s:.1f} s)"
        )
        bound = RECOVER_S + boot_s + AGENT_START_S
    assert recover_s <= bound, (
        f"{fault} at {phase}: converged after {recover_s:.1f} s (bound {bound:.0f} s)"
    )
