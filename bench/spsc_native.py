"""The paper's SPSC experiment on bare metal: what pinning and isolation buy under host load.

The paper (section 5.1) runs a Lamport SPSC queue whose producer and consumer pin themselves
to vCPUs 0 and 1, under N ``yes`` processes on the host, with and without the host applying
those pins to the vCPU threads. extpv applies them as *isolated* cpuset partitions, so the
pinned CPUs are taken away from other host load. This runner measures the three host-side
situations directly on a many-core machine, without a VM in between:

* ``unpinned``: producer and consumer float (the guest's pins mean nothing to the host);
* ``pinned``: they are pinned to CPUs 0 and 1, the ``yes`` load may run there too
  (what the paper's prototype did: ``sched_setaffinity`` only);
* ``isolated``: pinned, and the load is kept off CPUs 0 and 1 (what an isolated partition
  does; emulated here by confining the ``yes`` processes to the other CPUs).

Each (mode, load) point is repeated; results are the mean and its 90 % confidence interval
(Student's t), as in the paper. Writes ``<out>.json`` (every sample) and ``<out>.md``.

    make -C bench && python3 bench/spsc_native.py --loads 0,16,64 --reps 5 --duration 3

Needs only python3 and the spscq binary (``--spscq``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("unpinned", "pinned", "isolated")
PINNED_CPUS = (0, 1)

# Two-sided 90 % Student t quantiles (0.95 one-sided) by degrees of freedom.
_T95 = {
    1: 6.314,
    2: 2.920,
    3: 2.353,
    4: 2.132,
    5: 2.015,
    6: 1.943,
    7: 1.895,
    8: 1.860,
    9: 1.833,
    10: 1.812,
    12: 1.782,
    15: 1.753,
    20: 1.725,
    30: 1.697,
}


def t95(df: int) -> float:
    """The 0.95 quantile of Student's t with ``df`` degrees of freedom (conservative)."""
    if df >= 60:
        return 1.671 if df < 120 else 1.645
    return _T95[max(k for k in _T95 if k <= df)]


def ci90(samples: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 90 % confidence interval."""
    mean = statistics.fmean(samples)
    if len(samples) < 2:
        return mean, math.nan
    return mean, t95(len(samples) - 1) * statistics.stdev(samples) / math.sqrt(len(samples))


def start_load(count: int, cpus: set[int]) -> list[subprocess.Popen[bytes]]:
    """``count`` ``yes`` processes writing to /dev/null, allowed only on ``cpus``."""
    procs = []
    for _ in range(count):
        p = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
        os.sched_setaffinity(p.pid, cpus)
        procs.append(p)
    return procs


def stop_load(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=10)


def run_spscq(spscq: Path, mode: str, duration: float) -> float:
    p, c = PINNED_CPUS if mode != "unpinned" else (-1, -1)
    out = subprocess.run(
        [
            str(spscq),
            "--producer-cpu",
            str(p),
            "--consumer-cpu",
            str(c),
            "--duration",
            str(duration),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    return float(json.loads(out.stdout)["mpps"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spscq", type=Path, default=Path(__file__).with_name("spscq"))
    ap.add_argument(
        "--loads", default="0,16,64", help="numbers of yes processes (default %(default)s)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "spsc-native")
    args = ap.parse_args(argv)
    if not args.spscq.is_file():
        sys.exit(f"spsc_native: {args.spscq} not found; hint: make -C bench")
    online = os.sched_getaffinity(0)
    if not set(PINNED_CPUS) < online:
        sys.exit(f"spsc_native: needs CPUs {PINNED_CPUS} and at least one more")
    others = online - set(PINNED_CPUS)
    loads = [int(x) for x in args.loads.split(",")]

    samples: dict[str, dict[int, list[float]]] = {m: {n: [] for n in loads} for m in MODES}
    t0 = time.monotonic()
    for n in loads:
        for rep in range(args.reps):
            for mode in MODES:  # interleaved, so drift hits every mode alike
                load = start_load(n, others if mode == "isolated" else online)
                try:
                    time.sleep(0.2)  # let the load spread before measuring
                    samples[mode][n].append(run_spscq(args.spscq, mode, args.duration))
                finally:
                    stop_load(load)
                print(
                    f"load {n:3d} rep {rep} {mode:9s} {samples[mode][n][-1]:8.2f} Mpps",
                    file=sys.stderr,
                )

    machine = {
        "cpus": len(online),
        "kernel": platform.release(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
    }
    doc = {
        "machine": machine,
        "reps": args.reps,
        "duration_s": args.duration,
        "pinned_cpus": PINNED_CPUS,
        "samples_mpps": samples,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")

    lines = [
        "# SPSC queue under host load, bare metal (the paper's §5.1 without the VM)",
        "",
        f"{machine['cpu_model']}, {machine['cpus']} CPUs, kernel {machine['kernel']}; "
        f"{args.reps} runs of {args.duration:g} s per point, mean ± 90 % CI (Student t), Mpps. "
        f"Producer/consumer on CPUs {PINNED_CPUS[0]} and {PINNED_CPUS[1]} when pinned; "
        "*isolated* keeps the `yes` load off them, as extpv's isolated partitions do.",
        "",
        "| yes processes | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for n in loads:
        cells = []
        for mode in MODES:
            mean, half = ci90(samples[mode][n])
            cells.append(f"{mean:.1f} ± {half:.1f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Raw samples: `{args.out.with_suffix('.json').name}`. "
        f"Reproduce: `python3 bench/spsc_native.py --loads {args.loads} "
        f"--reps {args.reps} --duration {args.duration:g}`.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
