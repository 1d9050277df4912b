"""``pvctl status`` for people: the service's status as a compact per-VM table.

One header block (backend, isolation, host CPUs), then per VM one line of its settings and
connection and a table with a row per vCPU: host thread, whether the guest wants it pinned,
the pCPU it got, and what that pin achieved (``isolated`` or ``restricted``, read back by the
backend). Reasons for refusals and restrictions follow the table, since they are sentences.
``pvctl status --json`` is the machine-readable form.
"""

from __future__ import annotations

from typing import Any

from pvproto.cpulist import format_cpulist

__all__ = ["format_status", "isolation_mode"]

_COLUMNS = ("vCPU", "tid", "wanted", "pCPU", "mode")


def isolation_mode(status: dict[str, Any], placement: dict[str, Any]) -> str:
    """What one pin achieved for its pCPU, as the backend read it back: ``isolated`` (no
    other task may run there) or ``restricted`` (other tasks may; ``isolation_reason`` says
    why); ``unknown`` from a service that does not say."""
    return str(placement.get("isolation") or "unknown")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "no request yet"
    if seconds < 120:
        return f"last request {seconds:.0f} s ago"
    if seconds < 7200:
        return f"last request {seconds / 60:.0f} min ago"
    return f"last request {seconds / 3600:.0f} h ago"


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def _vm_lines(status: dict[str, Any], name: str, vm: dict[str, Any]) -> list[str]:
    seq = f" (seq {vm['last_seq']})" if vm.get("last_seq") is not None else ""
    lines = [
        f"VM {name}: policy {vm['policy']} (remap {'on' if vm['remap'] else 'off'}), "
        f"quota {vm['quota']}; qmp {vm['qmp']}, channel {vm['channel']}; "
        f"{_age(vm.get('last_request_age_s'))}{seq}"
    ]
    wanted = {int(v) for v in vm.get("wanted", [])}
    refused = {int(r["vcpu"]): r["refused"] for r in vm.get("result", []) if r.get("refused")}
    placements = vm.get("placements", {})
    rows: list[tuple[str, ...]] = [_COLUMNS]
    vcpus = sorted({int(v) for v in vm.get("vcpus", {})} | {int(v) for v in placements} | wanted)
    for vcpu in vcpus:
        info = vm.get("vcpus", {}).get(str(vcpu), {})
        placed = placements.get(str(vcpu))
        if placed:
            pcpu, mode = str(placed["pcpu"]), isolation_mode(status, placed)
        elif vcpu in refused:
            pcpu, mode = "-", "refused"
        else:
            pcpu, mode = "-", "-"
        tid = info.get("tid", placed.get("tid") if placed else None)
        rows.append((str(vcpu), str(tid or "?"), "yes" if vcpu in wanted else "no", pcpu, mode))
    if len(rows) > 1:
        lines += _table(rows)
    else:
        lines.append("  no vCPU threads known (QMP not connected yet)")
    lines += [f"  vCPU {v} refused: {reason}" for v, reason in sorted(refused.items())]
    # Why a pin is restricted, once per distinct reason (usually one for the whole host).
    why: dict[str, list[str]] = {}
    for vcpu, placed in sorted(placements.items(), key=lambda item: int(item[0])):
        if placed.get("isolation_reason"):
            why.setdefault(str(placed["isolation_reason"]), []).append(vcpu)
    lines += [f"  vCPU {', '.join(v)} restricted: {reason}" for reason, v in why.items()]
    for prog, state in vm.get("programs", {}).items():
        lines.append(f"  program {prog}: {state}")
    # Services: only what is not running as configured (`pvctl service list` shows them all).
    for service, info in vm.get("services", {}).items():
        if service == "_dropped":
            dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(info.items()))
            lines.append(f"  service records dropped: {dropped}")
        elif info.get("state") != "enabled":
            lines.append(f"  service {service}: {info.get('state')}")
    return lines


def format_status(status: dict[str, Any]) -> str:
    """The whole status as text (what ``pvctl status`` prints)."""
    host = status["host"]
    detail = status.get("backend_detail", {})
    extra = " ".join(
        f"{k}={v}" for k, v in detail.items() if not isinstance(v, (dict, list)) and k != "backend"
    )
    lines = [
        f"backend: {status['backend']}" + (f"  {extra}" if extra else ""),
        f"isolation: {status.get('isolation', 'unknown')}",
        f"host CPUs: online {format_cpulist(host['online']) or '-'}  "
        f"housekeeping {format_cpulist(host['housekeeping']) or '-'}  "
        f"eligible {format_cpulist(host['eligible']) or '-'}",
    ]
    lv = status.get("libvirt")
    if lv:
        lines.append(f"libvirt {lv['uri']}: {lv['state']}, {len(lv['domains'])} domain(s)")
        lines += [f"  domain {d!r} skipped: {why}" for d, why in lv["skipped"].items()]
    for name, vm in status["vms"].items():
        lines.append("")
        lines += _vm_lines(status, name, vm)
    for name in status.get("orphans", {}):
        lines.append(f"placements of VM {name} without a session (will be reconciled)")
    return "\n".join(lines)
