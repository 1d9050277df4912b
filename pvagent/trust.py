"""Trust before load: who signed the program, and what the kernel would receive.

1. **Signature** (:meth:`TrustPolicy.check`, before any byte reaches a loader). An Ed25519
   signature over the program's *envelope* (:func:`pvproto.program_envelope`: program id,
   kind, payload digest, version) must verify against one of the public keys (PEM,
   SubjectPublicKeyInfo) in ``/etc/pvagent/trusted.d/*.pem``. A captured ``LoadProgram``
   is thus worthless under another id or kind; an older version under the same id is
   refused by the agent (:mod:`pvagent.replay`). With ``trust = "signed"`` (the default)
   and no key there, every program is refused. ``trust = "any"`` skips this check:
   INSECURE, anyone who can write to the port can then run tracing code in the guest
   kernel; for development only.
2. **Static check of an object** (also in :meth:`TrustPolicy.check`): its executable
   sections are read as ELF, with their relocations, so a kfunc call (``call -1`` relocated
   to an undefined symbol, see :mod:`pvagent.elf`) is seen under its name.
3. **What the loader is about to load** (:meth:`TrustPolicy.vet`, called by the loaders
   after libbpf opened the object / bcc compiled the source, and before anything is loaded
   into the kernel or attached): every program with its attach point and the helpers and
   kfuncs its instructions call, and every map with its type and pinning.

   * Attach points, in libbpf section syntax, are matched against shell-style patterns.
     The default, :data:`DEFAULT_ALLOW`, admits only tracepoints (``tracepoint/``, ``tp/``,
     ``raw_tracepoint/``, ``raw_tp/``, ``tp_btf/``) and the task iterator (``iter/task``, run
     once after load): programs that observe. Everything
     else is refused unless configured (``allow_attach``), in particular program types
     that change kernel behaviour (xdp, tc, lsm, struct_ops, cgroup/*, fmod_ret) and
     kprobes/fentry.
   * Helpers that write user memory, send signals, override return values or call
     ``bpf()`` are refused whatever the patterns (:data:`DENIED_HELPERS`).
   * kfunc calls are refused unless their name is in ``allow_kfuncs`` (empty by default):
     kfuncs can do anything the kernel can (``bpf_send_signal_task``, …).
   * Pinned maps (``LIBBPF_PIN_BY_NAME``, bcc's ``BPF_TABLE_PINNED``) are refused unless
     ``allow_pinning``: a pin shares a map with every other program of the guest (a
     program could write another application's map); when allowed, the pins a program
     created are removed when it is unloaded. ``struct_ops`` maps are always refused.

   For bcc sources this is the compiled bytecode, not the text: comments, macros,
   ``BPF_FUNC_*`` constants or literal helper ids change nothing. bcc's automatic attach
   is off; the loader attaches the vetted functions itself.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from pvagent.elf import KFUNC, ElfError, helper_calls, program_sections
from pvagent.errors import TrustRefused
from pvproto import LoadProgram, ProgramKind

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_TRUSTED_DIR",
    "DENIED_HELPERS",
    "MapView",
    "ProgramView",
    "TrustPolicy",
    "Vet",
    "attach_points",
]

log = logging.getLogger(__name__)

DEFAULT_TRUSTED_DIR = Path("/etc/pvagent/trusted.d")
DEFAULT_ALLOW: tuple[str, ...] = (
    "tracepoint/*",
    "tp/*",
    "raw_tracepoint/*",
    "raw_tp/*",
    "tp_btf/*",
    # Task iterators only read (run once after load: an object finds what existed before it).
    "iter/task",
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

#: enum bpf_map_type: a struct_ops map replaces kernel operations (e.g. TCP congestion).
_BPF_MAP_TYPE_STRUCT_OPS = 26


@dataclass(frozen=True)
class ProgramView:
    """One program as its loader is about to load it."""

    name: str
    #: Where it would attach, in libbpf section syntax (``tracepoint/cat/event``).
    attach: str
    #: Helper ids its instructions call, plus :data:`pvagent.elf.KFUNC` for unnamed kfuncs.
    calls: frozenset[int | str] = frozenset()
    #: Names of the kernel functions (kfuncs) it calls.
    kfuncs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class MapView:
    """One map as its loader is about to create (or reuse) it."""

    name: str
    type: int
    #: Why it is shared beyond this program (a pin path, an existing map); None if private.
    pinned: str | None = None


#: What a loader calls before loading anything: returns the attach points or raises
#: :class:`~pvagent.errors.TrustRefused`.
Vet = Callable[[Sequence[ProgramView], Sequence[MapView]], list[str]]


def _object_views(payload: bytes) -> list[ProgramView]:
    try:
        sections = program_sections(payload)
    except ElfError as err:
        raise TrustRefused(f"not a valid eBPF object: {err}") from err
    return [
        ProgramView(
            s.name, s.name.removeprefix("?"), frozenset(helper_calls(s.data)), s.extern_calls
        )
        for s in sections
    ]


def attach_points(kind: ProgramKind, payload: bytes) -> list[str]:
    """Where an object's programs would attach, from its section names (``.text`` holds
    subprograms, attached nowhere). A bcc source's are known only once compiled: []."""
    if kind != "bpf-object":
        return []
    return [v.attach for v in _object_views(payload) if v.name != ".text"]


@dataclass(frozen=True)
class TrustPolicy:
    """Which programs this agent loads. Build it with :meth:`from_config`."""

    mode: TrustMode = "signed"
    keys: tuple[tuple[str, Ed25519PublicKey], ...] = ()
    allow: tuple[str, ...] = DEFAULT_ALLOW
    #: kfuncs a program may call, by name (shell patterns); none by default.
    allow_kfuncs: tuple[str, ...] = ()
    #: Whether a program may pin its maps (or use another program's pinned map).
    allow_pinning: bool = False
    #: Files in the trusted directory that could not be used, with why.
    problems: tuple[str, ...] = field(default=())
    trusted_dir: Path = DEFAULT_TRUSTED_DIR

    @classmethod
    def from_config(
        cls,
        trusted_dir: Path = DEFAULT_TRUSTED_DIR,
        mode: TrustMode = "signed",
        allow: tuple[str, ...] = DEFAULT_ALLOW,
        *,
        allow_kfuncs: tuple[str, ...] = (),
        allow_pinning: bool = False,
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
        return cls(
            mode,
            tuple(keys),
            tuple(allow),
            tuple(allow_kfuncs),
            allow_pinning,
            tuple(problems),
            trusted_dir,
        )

    def check(self, message: LoadProgram) -> list[str]:
        """Signature over the envelope, then :meth:`inspect`; the attach points known so far.

        Raises :class:`TrustRefused` with the reason. The loader still calls :meth:`vet`.
        """
        if self.mode == "signed":
            self._check_signature(message.envelope(), message.signature)
        return self.inspect(message.kind, message.payload)

    def inspect(self, kind: ProgramKind, payload: bytes) -> list[str]:
        """The checks that need no loader: an object's sections, calls and kfuncs (a bcc
        source is judged once compiled, by :meth:`vet`)."""
        if kind != "bpf-object":
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TrustRefused(f"a bcc source must be UTF-8 text: {err}") from err
            return []
        views = _object_views(payload)
        self._check_programs(views)
        return [v.attach for v in views if v.name != ".text"]

    def vet(self, programs: Sequence[ProgramView], maps: Sequence[MapView]) -> list[str]:
        """Judge what a loader is about to load (see module docstring); its attach points."""
        attached = [p for p in programs if p.name != ".text"]
        if not attached:
            raise TrustRefused("the program declares no attach point")
        self._check_programs(programs)
        for bmap in maps:
            if bmap.type == _BPF_MAP_TYPE_STRUCT_OPS:
                raise TrustRefused(f"map {bmap.name!r} is a struct_ops map (replaces kernel code)")
            if bmap.pinned is not None and not self.allow_pinning:
                raise TrustRefused(
                    f"map {bmap.name!r} is pinned ({bmap.pinned}): pinned maps are shared "
                    "with other programs and are not allowed (allow_pinning = false)"
                )
        return [p.attach for p in attached]

    def _check_programs(self, programs: Iterable[ProgramView]) -> None:
        for view in programs:
            where = (
                f"{view.attach!r}"
                if view.name in {view.attach, ".text"}
                else (f"{view.name} ({view.attach})")
            )
            if view.name != ".text" and not _matches(view.attach, self.allow):
                raise TrustRefused(
                    f"attach point {view.attach!r} is not allowed "
                    f"(allowed: {', '.join(self.allow)})"
                )
            denied = sorted(
                DENIED_HELPERS[c] for c in view.calls if isinstance(c, int) and c in DENIED_HELPERS
            )
            if denied:
                raise TrustRefused(f"{where} calls {', '.join(denied)}")
            if KFUNC in view.calls:
                raise TrustRefused(f"{where} calls kernel functions (kfuncs) by an unknown name")
            kfuncs = sorted(k for k in view.kfuncs if not _matches(k, self.allow_kfuncs))
            if kfuncs:
                raise TrustRefused(
                    f"{where} calls kernel function(s) {', '.join(kfuncs)} (kfuncs), not in "
                    f"allow_kfuncs ({', '.join(self.allow_kfuncs) or 'empty'})"
                )

    def _check_signature(self, envelope: bytes, signature: bytes) -> None:
        if not self.keys:
            raise TrustRefused(
                f"no trusted key in {self.trusted_dir}: every program is refused "
                '(install the host\'s public key there, or set trust = "any" — insecure)'
            )
        if not signature:
            raise TrustRefused("unsigned program (trust = signed)")
        for _name, key in self.keys:
            try:
                key.verify(signature, envelope)
            except InvalidSignature:
                continue
            return
        raise TrustRefused(
            f"signature does not verify with any of the {len(self.keys)} trusted key(s) in "
            f"{self.trusted_dir} (unknown key, tampered payload, or a program signed for "
            "another id, kind or version)"
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
