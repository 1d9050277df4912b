"""The paper's experiments (section 5, Figs 4-8) through a real VM, with 90 % confidence intervals.

Boots the test image (``-smp 2``, the lab's launcher), runs this checkout's ``pvhost`` daemon
(identity policy: vCPU i → pCPU i) and, for each point, the guest's SPSC workload (``spscq``:
producer pinned to vCPU 0, consumer to vCPU 1) while the host runs N ``yes`` processes:

  Fig 4/5  host load N x extpv {off, restrict, isolate} x serialization {0, 5, 10, 20 %}
           off: pvhost stopped, so the guest's pins never reach the host;
           restrict/isolate: what the host's placement backend really does (cgroup v1 cpusets
           restrict the vCPU thread; cgroup v2 isolated partitions also take the pCPU away
           from other tasks); modes the backend cannot do are skipped, saying why.
           Serialization: for that fraction of every second the harness forces both vCPU
           threads onto pCPU 0 (sched_setaffinity); with extpv on, the vCPU threads' cpusets
           bound their affinity, so the kernel refuses to move vCPU 1 (EINVAL): counted.
  Fig 6/7  ht-aware policy vs identity, on SMT hosts only (skipped, saying why, elsewhere).
  Fig 8    the same queue natively on the host (bench/spscq, pinned to CPUs 0/1 or unpinned)
           beside the guest runs: the virtualisation overhead as one ratio.

Each point is repeated (--reps), reported as mean ± 90 % CI (Student t); every sample is kept.
Output directory: results.json (samples, machine, configuration), results.md (tables) and one
plot per figure (PNG and SVG). Ctrl-C stops cleanly (no yes, VM or cgroup left) and keeps the
measured samples; --resume continues from results.json. Needs root, QEMU and the test image.

examples:
  sudo .venv/bin/python bench/experiment.py --quick --out /tmp/xp       # CI subset, minutes
  sudo .venv/bin/python bench/experiment.py --out /tmp/xp --reps 5      # the full set
  sudo .venv/bin/python bench/experiment.py --out /tmp/xp --resume      # after a Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import exp_report  # noqa: E402
from exp_host import Serializer, Watcher, YesLoad, allowed, cpulist  # noqa: E402

GUEST_MODES = ("off", "restrict", "isolate")
NATIVE_MODES = ("pinned", "unpinned")
#: A host with more ``yes`` processes per CPU than this is not "loaded", it is thrashing.
MAX_LOAD_PER_CPU = 16
BOOT_DEADLINE_S = 300
QUICK = {
    "loads": "0,2x",
    "modes": "off,restrict,isolate",
    "serialization": "0,20",
    "native": "pinned,unpinned",
    "reps": 3,
    "duration": 1.0,
}


class InputError(Exception):
    """Bad input, found before anything started."""


# -- the plan ----------------------------------------------------------------------------------


def online_cpus() -> set[int]:
    return os.sched_getaffinity(0)


def parse_loads(text: str, ncpu: int) -> list[int]:
    """``"0,1x,2x,16"`` → ``[0, ncpu, 2*ncpu, 16]`` (sorted, unique), within the machine's reach."""
    loads: set[int] = set()
    for tok in filter(None, (t.strip() for t in text.split(","))):
        try:
            n = int(tok[:-1]) * ncpu if tok.endswith("x") else int(tok)
        except ValueError:
            raise InputError(
                f"bad load {tok!r}: use a count (16) or a multiple of CPUs (4x)"
            ) from None
        if n < 0:
            raise InputError(f"bad load {tok!r}: a number of yes processes is >= 0")
        if n > MAX_LOAD_PER_CPU * ncpu:
            raise InputError(
                f"load {tok!r} = {n} yes processes is more than this {ncpu}-CPU machine can take "
                f"for a meaningful run (at most {MAX_LOAD_PER_CPU} per CPU = "
                f"{MAX_LOAD_PER_CPU * ncpu})"
            )
        loads.add(n)
    if not loads:
        raise InputError("no load given (--loads 0,1x,2x)")
    return sorted(loads)


def parse_choices(text: str, allowed_values: tuple[str, ...], what: str) -> list[str]:
    got = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in got if t not in allowed_values]
    if bad:
        raise InputError(
            f"unknown {what} {', '.join(map(repr, bad))}: choose from {', '.join(allowed_values)}"
        )
    return list(dict.fromkeys(got))


def parse_serialization(text: str) -> list[float]:
    out: set[float] = set()
    for tok in filter(None, (t.strip().rstrip("%") for t in text.split(","))):
        try:
            pct = float(tok)
        except ValueError:
            raise InputError(f"bad serialization {tok!r}: a percentage such as 10") from None
        if not 0 <= pct <= 90:
            raise InputError(f"serialization {tok!r}% is out of range [0, 90]")
        out.add(pct)
    if not out:
        raise InputError("no serialization given (--serialization 0,5,10,20)")
    return sorted(out)


def host_cgroup_mode() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    if Path("/sys/fs/cgroup/cpuset/cpuset.cpus").exists():
        return "v1"
    return "none"


def smt_active() -> bool:
    try:
        return Path("/sys/devices/system/cpu/smt/active").read_text().strip() == "1"
    except OSError:
        sib = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
        return sib.exists() and any(c in sib.read_text() for c in ",-")


def backend_modes(cgroup: str) -> tuple[str | None, str]:
    """The extpv mode this host's placement backend really provides, and why not the other."""
    if cgroup == "v1":
        return "restrict", (
            "this host has cgroup v1 cpusets: pvhost's cgroup1 backend restricts each pinned "
            "vCPU thread to its pCPU; it isolates the pCPU only from the cpusets named in "
            "[placement] isolate_from, never from tasks of the root cpuset, where this "
            "harness's yes load runs (as the paper's: anywhere on the host). Isolated "
            "partitions need cgroup v2 (cpuset.cpus.partition=isolated)"
        )
    if cgroup == "v2":
        from pvhost.errors import PlacementError
        from pvhost.placement.cgroup2 import probe_mode

        try:  # what the kernel accepts, tried as pvhost tries it (never a version string)
            mode = probe_mode(Path("/sys/fs/cgroup"))
        except PlacementError as err:
            return "restrict", f"pvhost could not probe cpuset partitions here: {err}"
        if mode == "remote":
            return "isolate", (
                "this host's cgroup v2 backend isolates every pinned pCPU (remote partitions); "
                "it has no restrict-only setting"
            )
        if mode == "local":
            return "isolate", (
                "this host's cgroup v2 backend isolates every pinned pCPU with a chain of local "
                "partitions (one extra CPU per pinned VM); it has no restrict-only setting"
            )
        return "restrict", (
            "this kernel has no isolated cpuset partitions: pvhost's cgroup2 backend only "
            "restricts the vCPU threads"
        )
    return None, "no cpuset controller is mounted: pvhost cannot place vCPU threads here"


@dataclass(frozen=True)
class Point:
    kind: str  # guest | native
    mode: str  # off | restrict | isolate | ht-aware | pinned | unpinned
    load: int
    ser: float = 0.0

    @property
    def id(self) -> str:
        if self.kind == "native":
            return f"native/{self.mode}/load={self.load}"
        return f"guest/{self.mode}/load={self.load}/ser={self.ser:g}"

    @property
    def figs(self) -> list[str]:
        if self.kind == "native":
            return ["8"]
        if self.mode == "ht-aware":
            return ["6", "7"]
        figs = ["4"] if self.ser == 0 else []
        return figs + ["5"] + (["8"] if self.ser == 0 else [])


@dataclass
class Plan:
    loads: list[int]
    guest_modes: list[str]
    serialization: list[float]
    native: list[str]
    reps: int
    duration: float
    period: float
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: The resolved options (defaults and --quick applied): saved, and reused by --resume.
    config: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[Point]:
        pts = [Point("native", m, n) for n in self.loads for m in self.native]
        for mode in self.guest_modes:
            sers = [0.0] if mode == "ht-aware" else self.serialization
            pts += [Point("guest", mode, n, s) for n in self.loads for s in sers]
        return pts


def make_plan(args: argparse.Namespace, ncpu: int) -> Plan:
    cfg = {k: getattr(args, k) for k in QUICK}
    if args.quick:
        cfg = {k: (cfg[k] if cfg[k] is not None else v) for k, v in QUICK.items()}
    defaults = {
        "loads": "0,1x,2x,4x,8x",
        "modes": "off,restrict,isolate",
        "serialization": "0,5,10,20",
        "native": "pinned,unpinned",
        "reps": 5,
        "duration": 3.0,
    }
    cfg = {k: (v if v is not None else defaults[k]) for k, v in cfg.items()}
    if int(cfg["reps"]) < 2:
        raise InputError("--reps must be >= 2: a confidence interval needs two samples")
    if not 0.2 <= float(cfg["duration"]) <= 600:
        raise InputError("--duration must be in [0.2, 600] seconds")
    if not 0.1 <= args.period <= 60:
        raise InputError("--period must be in [0.1, 60] seconds")
    wanted = parse_choices(str(cfg["modes"]), GUEST_MODES, "extpv mode")
    native = (
        []
        if cfg["native"] == "none"
        else parse_choices(str(cfg["native"]), NATIVE_MODES, "native mode")
    )
    plan = Plan(
        loads=parse_loads(str(cfg["loads"]), ncpu),
        guest_modes=[],
        serialization=parse_serialization(str(cfg["serialization"])),
        native=native,
        reps=int(cfg["reps"]),
        duration=float(cfg["duration"]),
        period=args.period,
        config={**cfg, "period": args.period},
    )
    have, why = backend_modes(host_cgroup_mode())
    for mode in wanted:
        if mode in ("off", have):
            plan.guest_modes.append(mode)
        else:
            plan.skipped.append({"what": f"extpv {mode} (Figs 4/5)", "why": why})
    if smt_active():
        if have is not None and "off" in plan.guest_modes:
            plan.guest_modes.append("ht-aware")
    else:
        plan.skipped.append(
            {
                "what": "Figs 6/7 (Hyper-Thread pinning: ht-aware vs identity)",
                "why": "this host has no SMT (no sibling hardware threads), so there is no "
                "Hyper-Thread placement to compare",
            }
        )
    return plan


# -- the machine and the results file ----------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout.strip().splitlines() or ["?"])[0]


def machine_info(accel: str) -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "host": platform.node(),
        "cpus": len(online_cpus()),
        "cpu_model": model,
        "smt": smt_active(),
        "kernel": platform.release(),
        "cgroup": host_cgroup_mode(),
        "accel": accel,
        "qemu": _cmd(["qemu-system-x86_64", "--version"]),
        "commit": _cmd(["git", "-C", str(REPO), "rev-parse", "HEAD"])
        + ("+dirty" if dirty not in ("", "?") else ""),
        "loadavg_at_start": os.getloadavg(),
    }


def save(path: Path, doc: dict[str, Any]) -> None:
    """Write ``results.json`` atomically: an interrupt never leaves half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


# -- one VM, one pvhost, switched between modes ------------------------------------------------


class Lab:
    """The booted test VM and the pvhost daemon, and the extpv mode they are in now."""

    def __init__(self, run_dir: Path, image: Any) -> None:
        from vmlab import VMSpec, start

        self.run_dir = run_dir
        runtime = run_dir / "vms"
        runtime.mkdir(parents=True, exist_ok=True)
        self.name = f"xp-{os.getpid()}"
        t0 = time.monotonic()
        self.vm = start(
            VMSpec(
                name=self.name,
                image=image.path,
                smp=2,
                memory_mib=1024,
                runtime_dir=runtime,
                test_hook=True,
            ),
            deadline_s=BOOT_DEADLINE_S,
            retries=2,
        )
        self.boot_s = time.monotonic() - t0
        try:
            self._setup(run_dir, runtime, image)
        except BaseException:
            self.vm.stop()
            raise

    def _setup(self, run_dir: Path, runtime: Path, image: Any) -> None:
        from vmlab.daemon import PvhostDaemon

        (run_dir / "pvhost").mkdir(exist_ok=True)
        # Its own runtime directory, state and cpuset group: it sees only this VM.
        self.daemon = PvhostDaemon(
            run_dir / "pvhost", runtime, image.signing_key, group=f"extpv-xp-{os.getpid()}"
        )
        self.tids = {v: t.tid for v, t in self.vm.vcpu_threads().items() if v in (0, 1)}
        self.qemu_affinity = os.sched_getaffinity(self.tids[0])
        self.mode = "off"
        self.running = False
        self.backend: dict[str, Any] = {}
        self.offset, self.offset_err = self.vm.clock_offset()

    def _stop_daemon(self) -> None:
        if self.running:
            self.daemon.kill(signal.SIGTERM)
            self.running = False

    def set_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        self._stop_daemon()
        if mode != "off":
            policy = "ht-aware" if mode == "ht-aware" else "identity"
            text = self.daemon.config.read_text()
            for p in ("identity", "ht-aware"):
                text = text.replace(f'policy = "{p}"', f'policy = "{policy}"')
            self.daemon.config.write_text(text)
            self.daemon.start()
            self.running = True
            st = self.daemon.wait_status(
                "the affinity program loaded in the guest",
                lambda s: s["vms"][self.name]["programs"] == {"affinity": "loaded"},
                180,
            )
            self.backend = {"backend": st.get("backend"), "policy": policy}
        self.mode = mode
        self.wait_released()
        off, err = self.vm.clock_offset()
        self.offset, self.offset_err = (self.offset + off) / 2, max(err, self.offset_err)

    def wait_released(self, deadline_s: float = 15.0) -> bool:
        """Wait until both vCPU threads may run on QEMU's CPUs again (the last pins let go)."""
        want = cpulist(self.qemu_affinity)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if all(allowed(t) == want for t in self.tids.values()):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        try:
            self.vm.stop()
        finally:
            try:
                self.daemon.close()
            finally:
                shutil.rmtree(self.run_dir, ignore_errors=True)


def guest_sample(lab: Lab, p: Point, plan: Plan) -> dict[str, Any]:
    lab.set_mode(p.mode)
    released = lab.wait_released(5.0 if p.mode != "off" else 1.0)
    on = p.mode != "off"
    with YesLoad(p.load):
        time.sleep(0.3)  # let the load spread before measuring
        watcher = Watcher(lab.tids, {0: "0", 1: "1"} if on else {})
        ser = None
        if p.ser > 0:
            ser = Serializer(
                list(lab.tids.values()), 0, lab.qemu_affinity, p.ser / 100, plan.period
            )
        watcher.start()
        if ser is not None:
            ser.start()
        try:
            res = lab.vm.guest(
                ["sh", "-c", f"date +%s.%N; exec spscq --duration {plan.duration:g} --json"],
                timeout_s=plan.duration + 180,
            ).check()
        finally:
            ser_stats = ser.stop() if ser is not None else None
            watcher.stop()
    lines = res.stdout.strip().splitlines()
    started_guest = float(lines[0])
    out = json.loads(lines[-1])
    pin_ms = None
    if watcher.placed_at is not None and released:
        pin_ms = round((watcher.placed_at - (started_guest - lab.offset)) * 1000, 2)
    return {
        "mpps": out["mpps"],
        "seconds": out["seconds"],
        "placed": watcher.placed_at is not None,
        "released_before": released,
        "pin_to_placement_ms": pin_ms,
        "allowed_seen": {str(v): sorted(s) for v, s in watcher.seen.items()},
        "serialization": ser_stats,
        "loadavg1": round(os.getloadavg()[0], 2),
    }


def native_sample(spscq: Path, p: Point, plan: Plan) -> dict[str, Any]:
    cpus = ("0", "1") if p.mode == "pinned" else ("-1", "-1")
    with YesLoad(p.load):
        time.sleep(0.3)
        proc = subprocess.run(
            [
                str(spscq),
                "--producer-cpu",
                cpus[0],
                "--consumer-cpu",
                cpus[1],
                "--duration",
                f"{plan.duration:g}",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=plan.duration + 60,
            check=True,
        )
    out = json.loads(proc.stdout)
    return {
        "mpps": out["mpps"],
        "seconds": out["seconds"],
        "loadavg1": round(os.getloadavg()[0], 2),
    }


def schedule(plan: Plan, done: dict[str, int]) -> Iterator[tuple[Point, int]]:
    """Repetition rounds; in each, native points, then guest modes (order alternating per
    round, so a mode switch — a pvhost stop or start — happens about once per round)."""
    pts = plan.points()
    for rep in range(plan.reps):
        modes = plan.guest_modes if rep % 2 == 0 else plan.guest_modes[::-1]
        order = [p for p in pts if p.kind == "native"]
        order += [p for m in modes for p in pts if p.kind == "guest" and p.mode == m]
        for p in order:
            if done.get(p.id, 0) <= rep:
                yield p, rep


# -- the command ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench/experiment.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out", type=Path, required=True, help="output directory (results.json, results.md, plots)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI subset sized for 2 CPUs: loads 0,2x; serialization 0,20; 3 reps of 1 s "
        "(explicit options still win)",
    )
    ap.add_argument(
        "--loads", help="host yes processes: counts or CPU multiples (default 0,1x,2x,4x,8x)"
    )
    ap.add_argument(
        "--modes",
        help="extpv modes: off,restrict,isolate (default all; what this host "
        "cannot do is skipped, saying why)",
    )
    ap.add_argument(
        "--serialization",
        help="percent of the run both vCPU threads are forced onto one pCPU (default 0,5,10,20)",
    )
    ap.add_argument("--native", help="Fig 8 native runs: pinned,unpinned or none (default both)")
    ap.add_argument("--reps", type=int, help="repetitions per point, >= 2 (default 5)")
    ap.add_argument("--duration", type=float, help="seconds per spscq run (default 3)")
    ap.add_argument(
        "--period",
        type=float,
        default=1.0,
        help="serialization period in seconds (default %(default)s)",
    )
    ap.add_argument(
        "--image",
        type=Path,
        help="prebuilt test image directory (default: build/reuse "
        "images/out/test/small of this checkout)",
    )
    ap.add_argument(
        "--spscq",
        type=Path,
        default=REPO / "bench" / "spscq",
        help="native spscq binary (make -C bench)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved configuration",
    )
    return ap


def preflight(args: argparse.Namespace) -> tuple[Plan, dict[str, Any] | None]:
    """Every check that can fail, before anything starts."""
    ncpu = len(online_cpus())
    results = args.out / "results.json"
    saved = None
    if args.resume:
        if not results.is_file():
            raise InputError(f"--resume: {results} does not exist")
        try:
            saved = json.loads(results.read_text())
            for k, v in saved["config"].items():
                setattr(args, k, v)
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"--resume: {results} is not a results file of this harness: {err}"
            ) from err
        args.quick = False
    elif results.exists():
        raise InputError(f"{results} exists: continue it with --resume, or choose another --out")
    if ncpu < 2 or not {0, 1} <= online_cpus():
        raise InputError(
            "needs CPUs 0 and 1 online (the guest's pins map to them); "
            f"have {cpulist(online_cpus())}"
        )
    plan = make_plan(args, ncpu)
    if os.geteuid() != 0:
        raise InputError("needs root (QEMU, cgroups, pvhost): run it with sudo")
    from vmlab.kvm import QEMU

    if plan.guest_modes and shutil.which(QEMU) is None:
        raise InputError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if plan.native and not os.access(args.spscq, os.X_OK):
        raise InputError(f"{args.spscq} is not built: make -C bench (or --native none)")
    if shutil.which("yes") is None:
        raise InputError("yes (coreutils) is not installed")
    if args.image is not None and not (args.image / "vmlinuz").is_file():
        raise InputError(f"--image {args.image}: not a test image directory (no vmlinuz)")
    if args.image is None and plan.guest_modes and not (REPO / "images" / "build-image").is_file():
        raise InputError("no test image: give --image DIR or run from an extpv checkout")
    return plan, saved


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan, saved = preflight(args)
    except InputError as err:
        print(f"experiment: {err}", file=sys.stderr)
        return 2
    for s in plan.skipped:
        print(f"experiment: skipping {s['what']}: {s['why']}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    config = plan.config
    doc: dict[str, Any] = saved or {
        "what": "spscq throughput in Mpps (guest: test image -smp 2, producer vCPU 0, consumer "
        "vCPU 1; native: bench/spscq on the host) under N host yes processes",
        "config": config,
        "machine": {},
        "points": {},
        "runs": [],
    }
    doc["skipped"] = plan.skipped
    for p in plan.points():
        doc["points"].setdefault(
            p.id,
            {
                "kind": p.kind,
                "mode": p.mode,
                "load": p.load,
                "ser": p.ser,
                "figs": p.figs,
                "samples": [],
            },
        )
    done = {pid: len(v["samples"]) for pid, v in doc["points"].items()}
    todo = list(schedule(plan, done))
    print(
        f"experiment: {len(todo)} samples to measure ({len(plan.points())} points x "
        f"{plan.reps} reps, {sum(done.values())} already in {path})",
        file=sys.stderr,
    )

    lab: Lab | None = None
    run_dir = Path("/run/extpv-bench") / f"xp-{os.getpid()}"
    interrupted = False
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    run_info: dict[str, Any] = {"started": now_iso(), "samples": 0}
    doc["runs"].append(run_info)
    t_start = time.monotonic()
    try:
        accel = "none"
        if any(p.kind == "guest" for p, _ in todo):
            from vmlab.images import GuestImage, ensure_test_image

            if args.image is not None:
                image = GuestImage(
                    args.image.resolve(), args.image.resolve().parent / "keys" / "signing.key"
                )
            else:
                print(
                    "experiment: test image (built if stale; minutes the first time)",
                    file=sys.stderr,
                )
                image = ensure_test_image(REPO)
            print("experiment: booting the VM …", file=sys.stderr)
            lab = Lab(run_dir, image)
            accel = lab.vm.accel
            run_info.update(
                boot_s=round(lab.boot_s, 1), clock_offset_err_ms=round(lab.offset_err * 1000, 2)
            )
            print(f"experiment: VM up in {lab.boot_s:.0f} s ({accel})", file=sys.stderr)
        if not doc["machine"]:
            doc["machine"] = machine_info(accel)
        save(path, doc)
        t_meas = time.monotonic()
        for i, (p, rep) in enumerate(todo, 1):
            if p.kind == "guest":
                assert lab is not None
                sample = guest_sample(lab, p, plan)
                if lab.backend:
                    doc["points"][p.id]["backend"] = lab.backend
            else:
                sample = native_sample(args.spscq, p, plan)
            sample.update(rep=rep, at=now_iso())
            doc["points"][p.id]["samples"].append(sample)
            run_info["samples"] += 1
            save(path, doc)
            per = (time.monotonic() - t_meas) / i
            extra = ""
            if sample.get("pin_to_placement_ms") is not None:
                extra += f", pin→placement {sample['pin_to_placement_ms']:.0f} ms"
            if sample.get("serialization"):
                s = sample["serialization"]
                extra += f", serialized {s['applied']}/{s['windows']}"
            print(
                f"[{i}/{len(todo)}] {p.id} rep {rep + 1}: {sample['mpps']:.3f} Mpps{extra}; "
                f"ETA {fmt_s(per * (len(todo) - i))}",
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with contextlib.suppress(BaseException):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
        if lab is not None:
            lab.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run_info.update(
            ended=now_iso(),
            wall_s=round(time.monotonic() - t_start, 1),
            interrupted=interrupted,
            loadavg_at_end=os.getloadavg(),
        )
        save(path, doc)
    exp_report.write(args.out, doc)
    if interrupted:
        print(
            f"experiment: interrupted; {run_info['samples']} samples kept in {path}; "
            f"continue with: bench/experiment.py --out {args.out} --resume",
            file=sys.stderr,
        )
        return 130
    print(
        f"experiment: done in {fmt_s(time.monotonic() - t_start)}: {args.out}/results.md",
        file=sys.stderr,
    )
    return 0


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_s(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


if __name__ == "__main__":
    sys.exit(main())
