"""What `./dev demo` must print beside the SPSC throughput (issue 9 item 5), read from the
playbook's output: for each pinned vCPU, its CPU share under the `yes` load before the guest's
pin and while it held, and the pin's isolation mode. Shared by the appliance test (the real
demo) and the unit test that shows this check fails when the demo stops printing them."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DemoShare", "demo_shares"]

_SHARE = re.compile(
    r"(vcpu\d+) CPU share under the load: (\d+)% before the guest's pin, (\d+)% while pinned "
    r"to pCPU (\d+) \(throughput ([0-9.]+) Mpps\)"
)
_THROUGHPUT = re.compile(r"throughput: ([0-9.]+) Mpps over \d+ s")
_LOAD = re.compile(r"host load: \d+ `yes` processes")


@dataclass(frozen=True)
class DemoShare:
    vcpu: str
    before: int  # percent of one CPU under the load before the guest's pin
    pinned: int  # ... while the pin held
    pcpu: int
    isolation: str  # "isolated" or "restricted"


def _flat(output: str) -> str:
    """The playbook's output as one line: the YAML result format wraps long strings, doubles
    the single quotes of a single-quoted one, and folds a double-quoted one (chosen when a line
    holds a character YAML must escape) with a backslash at the break and ``\\ `` for a space
    that starts the next line."""
    unfolded = re.sub(r"\\\n\s*(\\ )?", lambda m: " " if m[1] else "", output)
    return re.sub(r"\s+", " ", unfolded).replace("''", "'")


def demo_shares(output: str) -> list[DemoShare]:
    """Every pinned vCPU's share and isolation lines in ``output``; AssertionError, saying what
    is missing, when the demo printed no load, no share, no mode, or a malformed one."""
    flat = _flat(output)
    assert _LOAD.search(flat), "the demo printed no `host load:` line (its yes load)"
    throughput = _THROUGHPUT.search(flat)
    assert throughput, "the demo printed no SPSC throughput"
    shares = []
    for m in _SHARE.finditer(flat):
        vcpu, before, pinned, pcpu, mpps = m.groups()
        assert 0 <= int(before) <= 100 and 0 <= int(pinned) <= 100, m.group(0)
        assert mpps == throughput.group(1), f"share printed beside another throughput: {m[0]}"
        mode = re.search(
            rf"{vcpu} isolation: (?:(isolated) \(no other task may run on pCPU {pcpu}\)"
            rf"|(restricted): \w)",
            flat,
        )
        assert mode, f"no isolation mode line for {vcpu} (pinned to pCPU {pcpu})"
        shares.append(DemoShare(vcpu, int(before), int(pinned), int(pcpu), mode[1] or mode[2]))
    assert shares, "the demo printed no pinned vCPU's CPU share before and while pinned"
    return shares
