"""results.md and the figures (PNG and SVG) of bench/experiment.py, from its results.json.

One figure per paper figure with 90 % confidence intervals as error bars: fig4 (throughput
by host load, no serialization), fig5 (throughput by serialization, one panel per load),
fig6-7 (ht-aware vs identity, SMT hosts only) and fig8 (native vs guest by load).
Can be rerun on its own: ``python3 bench/exp_report.py OUT_DIR``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from exp_stats import ci90

__all__ = ["FIGURES", "summarize", "write"]

FIGURES = ("fig4", "fig5", "fig6-7", "fig8")
GUEST_ORDER = ("off", "restrict", "isolate", "ht-aware")
LABEL = {
    "off": "guest, extpv off",
    "restrict": "guest, extpv restrict",
    "isolate": "guest, extpv isolate",
    "ht-aware": "guest, extpv ht-aware",
    "pinned": "native, pinned",
    "unpinned": "native, unpinned",
}


def summarize(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Point id → its fields plus n, mean and ci (90 % half-width) of the throughput."""
    out = {}
    for pid, pt in doc["points"].items():
        xs = [s["mpps"] for s in pt["samples"]]
        mean, half = ci90(xs)
        out[pid] = {**pt, "n": len(xs), "mean": mean, "ci": half}
    return out


def _get(
    summ: dict[str, dict[str, Any]], kind: str, mode: str, load: int, ser: float = 0.0
) -> dict[str, Any] | None:
    for p in summ.values():
        if p["kind"] == kind and p["mode"] == mode and p["load"] == load and p.get("ser", 0) == ser:
            return p if p["n"] else None
    return None


def _cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    ci = "n/a" if math.isnan(p["ci"]) else f"{p['ci']:.3f}"
    return f"{p['mean']:.3f} ± {ci} (n={p['n']})"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if a is None or b is None or not b["mean"]:
        return "-"
    return f"{a['mean'] / b['mean']:.2f}x"


def _axes(summ: dict[str, dict[str, Any]]) -> tuple[list[int], list[float], list[str], list[str]]:
    loads = sorted({p["load"] for p in summ.values()})
    sers = sorted({p["ser"] for p in summ.values() if p["kind"] == "guest"})
    gmodes = [
        m
        for m in GUEST_ORDER
        if any(p["mode"] == m and p["kind"] == "guest" for p in summ.values())
    ]
    nmodes = [m for m in ("pinned", "unpinned") if any(p["mode"] == m for p in summ.values())]
    return loads, sers, gmodes, nmodes


def _goals(summ: dict[str, dict[str, Any]], doc: dict[str, Any]) -> list[str]:
    loads, sers, gmodes, _ = _axes(summ)
    cpus = doc["machine"].get("cpus", 0) or 1
    on = [m for m in gmodes if m in ("isolate", "restrict")]
    lines = []
    high = [n for n in loads if n >= 4 * cpus]
    for m in on:
        label = f"extpv {m}" + ("" if m == "isolate" else " (the goal names isolate, not run here)")
        for n in high:
            a, off, idle = (
                _get(summ, "guest", m, n),
                _get(summ, "guest", "off", n),
                _get(summ, "guest", m, 0),
            )
            if a and off and idle:
                r1, r2 = a["mean"] / off["mean"], a["mean"] / idle["mean"]
                lines.append(
                    f"- High load (N = {n} ≥ 4 x CPUs): {label} = {r1:.2f} x off (goal ≥ 3x: "
                    f"{'met' if r1 >= 3 else 'not met'}); = {r2:.2f} x its no-load throughput "
                    f"(goal ≥ 0.8x: {'met' if r2 >= 0.8 else 'not met'})."
                )
        if not high:
            lines.append(f"- High load (N ≥ 4 x CPUs): not measured (largest load {max(loads)}).")
        a, off = _get(summ, "guest", m, 0), _get(summ, "guest", "off", 0)
        if a and off:
            d = a["mean"] / off["mean"] - 1
            overlap = abs(a["mean"] - off["mean"]) <= (a["ci"] + off["ci"])
            lines.append(
                f"- No load: {label} is {d:+.1%} vs off (goal within ±5 %: "
                f"{'met' if abs(d) <= 0.05 else 'not met'}; the difference is "
                f"{'within' if overlap else 'outside'} the 90 % CIs)."
            )
        if len(sers) > 1:
            n = max(loads)
            base, worst = _get(summ, "guest", m, n, 0.0), _get(summ, "guest", m, n, max(sers))
            if base and worst:
                d = worst["mean"] / base["mean"] - 1
                overlap = abs(worst["mean"] - base["mean"]) <= (worst["ci"] + base["ci"])
                lines.append(
                    f"- Serialization at N = {n}: {label} at {max(sers):g} % is {d:+.1%} vs 0 % "
                    f"({'within' if overlap else 'outside'} the 90 % CIs; goal: no effect with "
                    "isolate)."
                )
    if not on:
        lines.append("- extpv on was not measured: no goal can be assessed.")
    lat = [
        s["pin_to_placement_ms"]
        for p in summ.values()
        for s in p["samples"]
        if s.get("pin_to_placement_ms") is not None
    ]
    if lat:
        lat.sort()
        lines.append(
            f"- Cost: spscq start in the guest → host placement seen, n = {len(lat)}: "
            f"median {statistics.median(lat):.0f} ms, p90 {lat[int(0.9 * (len(lat) - 1))]:.0f} ms, "
            f"max {lat[-1]:.0f} ms."
        )
    return lines


def markdown(doc: dict[str, Any], summ: dict[str, dict[str, Any]], plots: list[str]) -> str:
    m, cfg = doc["machine"], doc["config"]
    loads, sers, gmodes, nmodes = _axes(summ)
    runs = doc.get("runs", [])
    md = [
        "# SPSC queue through a VM under host load: the paper's Figs 4-8 (bench/experiment.py)",
        "",
        f"{doc['what']}. Mean ± 90 % CI (Student t) in Mpps, n = samples.",
        "",
        f"Machine: {m.get('host')} — {m.get('cpus')} CPUs ({m.get('cpu_model')}), SMT "
        f"{'on' if m.get('smt') else 'off'}, kernel {m.get('kernel')}, cgroup {m.get('cgroup')}, "
        f"accel {m.get('accel')}, {m.get('qemu')}; commit {m.get('commit')}.",
        f"Configuration: {cfg.get('reps')} reps of {cfg.get('duration')} s, serialization period "
        f"{cfg.get('period')} s; load average (1, 5, 15 min) at start "
        f"{[round(x, 2) for x in m.get('loadavg_at_start', [])]}.",
        "",
    ]
    if doc.get("notes"):
        md += ["## Conditions", "", *[f"- {n}" for n in doc["notes"]], ""]
    if doc.get("skipped"):
        md += (
            ["## Not measured here", ""]
            + [f"- **{s['what']}**: {s['why']}." for s in doc["skipped"]]
            + [""]
        )
    if gmodes:
        md += [
            "## Figs 4/5: guest throughput by host load and serialization",
            "",
            "| yes processes | serialization | "
            + " | ".join(LABEL[g] for g in gmodes)
            + (" | on / off |" if len(gmodes) > 1 else " |"),
            "|---|---|" + "---|" * (len(gmodes) + (len(gmodes) > 1)),
        ]
        for n in loads:
            for s in sers:
                row = [_get(summ, "guest", g, n, s) for g in gmodes]
                if not any(row):
                    continue
                ratio = [_ratio(row[-1], row[0])] if len(gmodes) > 1 else []
                md.append(
                    f"| {n} | {s:g} % | "
                    + " | ".join(_cell(c) for c in row)
                    + (" | " + ratio[0] if ratio else "")
                    + " |"
                )
        md.append("")
        ser_rows = []
        for g in gmodes:
            st = [
                s["serialization"]
                for p in summ.values()
                if p["mode"] == g
                for s in p["samples"]
                if s.get("serialization")
            ]
            if st:
                w = sum(x["windows"] for x in st)
                a = sum(x["applied"] for x in st)
                r = sum(x["refused_setaffinity"] for x in st)
                ser_rows.append(f"| {LABEL[g]} | {w} | {a} | {r} |")
        if ser_rows:
            md += [
                "Serialization windows (the harness forces both vCPU threads onto pCPU 0 with "
                "sched_setaffinity): how many the kernel applied. With extpv on, each vCPU thread "
                "sits in a cpuset holding only its pCPU, so moving vCPU 1's thread to pCPU 0 is "
                "refused (EINVAL): extpv's placement wins.",
                "",
                "| mode | windows | applied (both on one pCPU) | setaffinity refused |",
                "|---|---|---|---|",
                *ser_rows,
                "",
            ]
    if nmodes:
        cols = [LABEL[x] for x in nmodes] + [LABEL[g] for g in gmodes]
        md += [
            "## Fig 8: native vs guest (no serialization)",
            "",
            "| yes processes | "
            + " | ".join(cols)
            + " | guest off / native pinned | guest on / native pinned |",
            "|---|" + "---|" * (len(cols) + 2),
        ]
        on = next((g for g in gmodes if g != "off"), None)
        for n in loads:
            row = [_get(summ, "native", x, n) for x in nmodes] + [
                _get(summ, "guest", g, n) for g in gmodes
            ]
            nat = _get(summ, "native", "pinned", n)
            md.append(
                f"| {n} | "
                + " | ".join(_cell(c) for c in row)
                + f" | {_ratio(_get(summ, 'guest', 'off', n), nat)}"
                f" | {_ratio(_get(summ, 'guest', on, n), nat) if on else '-'} |"
            )
        md += ["", "Native runs share the host with the (idle) test VM.", ""]
    md += [
        "## Performance goals of issue #10 (recorded, not tuned for)",
        "",
        *_goals(summ, doc),
        "",
    ]
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p}.png) ([SVG]({p}.svg))" for p in plots] + [""]
    elif doc.get("plot_error"):
        md += [f"Plots: not drawn: {doc['plot_error']}", ""]
    md += (
        ["## Runs", ""]
        + [
            f"- {r.get('started')} → {r.get('ended')}: "
            f"{r.get('samples')} samples in {r.get('wall_s')} s"
            + (f", VM boot {r['boot_s']} s" if "boot_s" in r else "")
            + (
                f"; load average at end {[round(x, 2) for x in r['loadavg_at_end']]}"
                if r.get("loadavg_at_end")
                else ""
            )
            + (" (interrupted)" if r.get("interrupted") else "")
            for r in runs
        ]
        + [
            "",
            "Raw samples (with the placement seen, serialization counts and the load average "
            "during each run): `results.json`.",
        ]
    )
    return "\n".join(md) + "\n"


def _bars(
    ax: Any, groups: list[str], series: list[tuple[str, list[dict[str, Any] | None]]]
) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, pts) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ys = [p["mean"] if p else math.nan for p in pts]
        es = [p["ci"] if p and not math.isnan(p["ci"]) else 0.0 for p in pts]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("throughput (Mpps)")
    ax.set_ylim(bottom=0)  # a CI wider than the mean must not draw negative throughput
    ax.grid(axis="y", alpha=0.3)


def plot(out: Path, doc: dict[str, Any], summ: dict[str, dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads, sers, gmodes, nmodes = _axes(summ)
    host = f"{doc['machine'].get('cpus')} CPUs, {doc['machine'].get('accel')}"
    made = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        for ext in ("png", "svg"):
            fig.savefig(out / f"{name}.{ext}", dpi=110)
        plt.close(fig)
        made.append(name)

    base = [g for g in gmodes if g != "ht-aware"]
    if base:
        fig, ax = plt.subplots(figsize=(7, 4))
        _bars(
            ax,
            [str(n) for n in loads],
            [(LABEL[g], [_get(summ, "guest", g, n) for n in loads]) for g in base],
        )
        ax.set_xlabel("host yes processes")
        ax.set_title(f"Fig 4: vCPU pinning by host load, no serialization ({host})")
        ax.legend()
        save(fig, "fig4")
        panels = [n for n in loads if n > 0] or loads
        fig, axes = plt.subplots(
            1, len(panels), figsize=(max(7, 4 * len(panels)), 4.5), squeeze=False
        )
        for ax, n in zip(axes[0], panels, strict=True):
            _bars(
                ax,
                [f"{s:g} %" for s in sers],
                [(LABEL[g], [_get(summ, "guest", g, n, s) for s in sers]) for g in base],
            )
            ax.set_xlabel("serialization")
            ax.set_title(f"{n} yes processes")
        axes[0][0].legend()
        fig.suptitle(f"Fig 5: vCPU pinning with serialization ({host})")
        save(fig, "fig5")
    if "ht-aware" in gmodes:
        fig, ax = plt.subplots(figsize=(7, 4))
        pair = [g for g in gmodes if g != "off"]
        _bars(
            ax,
            [str(n) for n in loads],
            [(LABEL[g], [_get(summ, "guest", g, n) for n in loads]) for g in pair],
        )
        ax.set_xlabel("host yes processes")
        ax.set_title(f"Figs 6/7: Hyper-Thread pinning ({host})")
        ax.legend()
        save(fig, "fig6-7")
    if nmodes:
        fig, ax = plt.subplots(figsize=(7, 4))
        series = [(LABEL[x], [_get(summ, "native", x, n) for n in loads]) for x in nmodes]
        series += [(LABEL[g], [_get(summ, "guest", g, n) for n in loads]) for g in gmodes]
        _bars(ax, [str(n) for n in loads], series)
        ax.set_yscale("log")  # native and TCG guest differ by orders of magnitude
        ax.set_ylabel("throughput (Mpps, log scale)")
        ax.set_xlabel("host yes processes")
        ax.set_title(f"Fig 8: native vs guest ({host})")
        ax.legend(fontsize="small")
        save(fig, "fig8")
    return made


def write(out: Path, doc: dict[str, Any]) -> None:
    """results.md and the plots in ``out``."""
    summ = summarize(doc)
    try:
        plots = plot(out, doc, summ)
    except ImportError as err:
        plots, doc = [], {**doc, "plot_error": f"{err} (pip install '.[bench]')"}
    (out / "results.md").write_text(markdown(doc, summ, plots))


if __name__ == "__main__":
    d = Path(sys.argv[1])
    write(d, json.loads((d / "results.json").read_text()))
