"""Trust before load: who signed the program, and where it would attach.

Two independent checks, both before any byte reaches a loader:

1. **Signature.** An Ed25519 signature over the payload bytes must verify against one of
   the public keys (PEM, SubjectPublicKeyInfo) in ``/etc/pvagent/trusted.d/*.pem``.
   With ``trust = "signed"`` (the default) and no key there, every program is refused.
   ``trust = "any"`` skips this check: INSECURE, anyone who can write to the port can
   then run tracing code in the guest kernel; for development only.
2. **Allow-list of attach points.** Read from the object's ELF section names (libbpf's
   ``SEC()`` convention) or from the bcc source's probe declarations, matched with
   shell-style patterns. The default, :data:`DEFAULT_ALLOW`, admits only tracepoints
   (``tracepoint/``, ``tp/``, ``raw_tracepoint/``, ``raw_tp/``, ``tp_btf/``): programs that
   observe. Everything else is refused unless configured, in particular program types
   that change kernel behaviour (xdp, tc, lsm, struct_ops, cgroup/*, fmod_ret, socket
   filters) and kprobes/fentry (read-only too, but not needed by v1; add ``kprobe/*`` to
   ``allow_attach`` to admit them). Whatever the patterns, helpers that write user
   memory, send signals, override return values or call ``bpf()`` are refused
   (:data:`DENIED_HELPERS`), as are kfunc calls.

For bcc sources the attach and helper checks read the source text: bcc auto-attaches
only functions declared with its probe macros or name prefixes, which are all matched
here; the signature remains the security boundary.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from pvagent.elf import ElfError, helper_calls, program_sections
from pvagent.errors import TrustRefused
from pvproto import ProgramKind

__all__ = ["DEFAULT_ALLOW", "DEFAULT_TRUSTED_DIR", "DENIED_HELPERS", "TrustPolicy", "attach_points"]

log = logging.getLogger(__name__)

DEFAULT_TRUSTED_DIR = Path("/etc/pvagent/trusted.d")
DEFAULT_ALLOW: tuple[str, ...] = (
    "tracepoint/*",
    "tp/*",
    "raw_tracepoint/*",
    "raw_tp/*",
    "tp_btf/*",
)
#: Helpers that change state outside the program's own maps (id → name, from UAPI bpf.h).
DENIED_HELPERS: dict[int, str] = {
    36: "bpf_probe_write_user",
    58: "bpf_override_return",
    109: "bpf_send_signal",
    117: "bpf_send_signal_thread",
    166: "bpf_sys_bpf",
    168: "bpf_sys_close",
}
TrustMode = Literal["signed", "any"]

# bcc: probe macros and the function-name prefixes its BPF() constructor auto-attaches.
_BCC_MACRO = re.compile(
    r"\b(TRACEPOINT_PROBE|RAW_TRACEPOINT_PROBE|KFUNC_PROBE|KRETFUNC_PROBE|LSM_PROBE|KMOD_RET)"
    r"\s*\(([^)]*)\)"
)
_BCC_PREFIX = re.compile(
    r"\b(kprobe|kretprobe|tracepoint|raw_tracepoint|kfunc|kretfunc|lsm|kmod_ret|uprobe|uretprobe)"
    r"__(\w+)\s*\("
)
_BCC_SECTION = {
    "TRACEPOINT_PROBE": "tracepoint",
    "RAW_TRACEPOINT_PROBE": "raw_tracepoint",
    "KFUNC_PROBE": "fentry",
    "KRETFUNC_PROBE": "fexit",
    "LSM_PROBE": "lsm",
    "KMOD_RET": "fmod_ret",
    "kprobe": "kprobe",
    "kretprobe": "kretprobe",
    "tracepoint": "tracepoint",
    "raw_tracepoint": "raw_tracepoint",
    "kfunc": "fentry",
    "kretfunc": "fexit",
    "lsm": "lsm",
    "kmod_ret": "fmod_ret",
    "uprobe": "uprobe",
    "uretprobe": "uretprobe",
}


def _object_attach_points(payload: bytes) -> list[str]:
    try:
        sections = program_sections(payload)
    except ElfError as err:
        raise TrustRefused(f"not a valid eBPF object: {err}") from err
    points: list[str] = []
    for section in sections:
        calls = helper_calls(section.data)
        if "kfunc" in calls:
            raise TrustRefused(f"section {section.name!r} calls kernel functions (kfuncs)")
        denied = sorted(
            DENIED_HELPERS[c] for c in calls if isinstance(c, int) and c in DENIED_HELPERS
        )
        if denied:
            raise TrustRefused(f"section {section.name!r} calls {', '.join(denied)}")
        if section.name != ".text":  # .text holds subprograms, attached nowhere
            points.append(section.name.removeprefix("?"))
    return points


def _source_attach_points(payload: bytes) -> list[str]:
    try:
        source = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TrustRefused(f"a bcc source must be UTF-8 text: {err}") from err
    denied = sorted(name for name in DENIED_HELPERS.values() if name in source)
    if denied:
        raise TrustRefused(f"the source calls {', '.join(denied)}")
    points = []
    for macro, args in _BCC_MACRO.findall(source):
        parts = [a.strip() for a in args.split(",") if a.strip()]
        points.append("/".join([_BCC_SECTION[macro], *parts[:2]]))
    for prefix, rest in _BCC_PREFIX.findall(source):
        points.append(f"{_BCC_SECTION[prefix]}/{rest.replace('__', '/')}")
    return points


def attach_points(kind: ProgramKind, payload: bytes) -> list[str]:
    """Where the program would attach, in libbpf section syntax (``tracepoint/cat/event``)."""
    if kind == "bpf-object":
        return _object_attach_points(payload)
    return _source_attach_points(payload)


@dataclass(frozen=True)
class TrustPolicy:
    """Which programs this agent loads. Build it with :meth:`from_config`."""

    mode: TrustMode = "signed"
    keys: tuple[tuple[str, Ed25519PublicKey], ...] = ()
    allow: tuple[str, ...] = DEFAULT_ALLOW
    #: Files in the trusted directory that could not be used, with why.
    problems: tuple[str, ...] = field(default=())
    trusted_dir: Path = DEFAULT_TRUSTED_DIR

    @classmethod
    def from_config(
        cls,
        trusted_dir: Path = DEFAULT_TRUSTED_DIR,
        mode: TrustMode = "signed",
        allow: tuple[str, ...] = DEFAULT_ALLOW,
    ) -> TrustPolicy:
        keys: list[tuple[str, Ed25519PublicKey]] = []
        problems: list[str] = []
        for pem in sorted(trusted_dir.glob("*.pem")) if trusted_dir.is_dir() else []:
            try:
                key = load_pem_public_key(pem.read_bytes())
            except (OSError, ValueError) as err:
                problems.append(f"{pem}: {err}")
                continue
            if not isinstance(key, Ed25519PublicKey):
                problems.append(f"{pem}: not an Ed25519 public key ({type(key).__name__})")
                continue
            keys.append((pem.name, key))
        for problem in problems:
            log.warning("ignoring trusted key %s", problem)
        if mode == "any":
            log.warning("trust = any: programs are loaded WITHOUT signature checks (insecure)")
        return cls(mode, tuple(keys), tuple(allow), tuple(problems), trusted_dir)

    def check(self, kind: ProgramKind, payload: bytes, signature: bytes) -> list[str]:
        """Return the program's attach points, or raise :class:`TrustRefused` with the reason."""
        if self.mode == "signed":
            self._check_signature(payload, signature)
        points = attach_points(kind, payload)
        if not points:
            raise TrustRefused("the program declares no attach point")
        for point in points:
            if not any(fnmatch.fnmatchcase(point, pattern) for pattern in self.allow):
                raise TrustRefused(
                    f"attach point {point!r} is not allowed (allowed: {', '.join(self.allow)})"
                )
        return points

    def _check_signature(self, payload: bytes, signature: bytes) -> None:
        if not self.keys:
            raise TrustRefused(
                f"no trusted key in {self.trusted_dir}: every program is refused "
                '(install the host\'s public key there, or set trust = "any" — insecure)'
            )
        if not signature:
            raise TrustRefused("unsigned program (trust = signed)")
        for _name, key in self.keys:
            try:
                key.verify(signature, payload)
            except InvalidSignature:
                continue
            return
        raise TrustRefused(
            f"signature does not verify with any of the {len(self.keys)} trusted key(s) in "
            f"{self.trusted_dir} (unknown key, or tampered payload)"
        )
