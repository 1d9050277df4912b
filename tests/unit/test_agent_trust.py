"""Trust before load: envelope signatures against trusted.d keys, the replay book, and the
allow-lists (attach points, helpers, kfuncs, pinning) applied to what a loader would load."""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.elf import KFUNC, ElfError, helper_calls, program_sections
from pvagent.errors import TrustRefused
from pvagent.replay import VersionBook
from pvagent.trust import MapView, ProgramView, TrustPolicy, attach_points
from pvhost import signing
from pvhost.programs import sign_program
from pvproto import LoadProgram

OBJECT = bpfobj.read("affinity.bpf.o")
BCC = bpfobj.read("affinity.bcc.c")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(host private key, guest trusted dir holding its public key, a stranger's key)."""
    root = tmp_path_factory.mktemp("keys")
    private, public = signing.generate_keypair(root / "host")
    trusted = root / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    (trusted / "garbage.pem").write_text("not a key")  # ignored, reported as a problem
    stranger, _ = signing.generate_keypair(root / "stranger")
    return private, trusted, stranger


def _message(
    payload: bytes, key: Path | None, program_id: str = "affinity", **kw: object
) -> LoadProgram:
    kind = "bpf-object" if payload.startswith(b"\x7fELF") else "bcc-source"
    if key is None:
        return LoadProgram.for_payload("affinity", kind, payload, **kw)  # type: ignore[arg-type]
    return sign_program("affinity", kind, payload, key).message()


def test_signed_object_is_accepted(keys: tuple[Path, Path, Path]) -> None:
    private, trusted, _ = keys
    policy = TrustPolicy.from_config(trusted)
    assert len(policy.keys) == 1 and policy.problems
    points = policy.check(_message(OBJECT, private))
    assert points == [
        "tracepoint/syscalls/sys_enter_sched_setaffinity",
        "tracepoint/syscalls/sys_exit_sched_setaffinity",
        "tracepoint/sched/sched_process_fork",
        "tracepoint/sched/sched_process_exit",
        "iter/task",  # "?iter/task": run once after load by a protocol-4 agent
    ]
    assert policy.check(_message(BCC, private)) == []  # judged once compiled (vet)


@pytest.mark.parametrize(
    "case", ["unsigned", "unknown key", "tampered", "another id", "another kind", "another version"]
)
def test_bad_signatures_are_refused(keys: tuple[Path, Path, Path], case: str) -> None:
    """The signature covers id, kind, digest and version: change any and it fails."""
    private, trusted, stranger = keys
    policy = TrustPolicy.from_config(trusted)
    good = _message(OBJECT, private)
    changes: dict[str, dict[str, object]] = {
        "unsigned": {"signature": b""},
        "unknown key": {"signature": _message(OBJECT, stranger).signature},
        "tampered": {"payload": OBJECT[:-1] + bytes([OBJECT[-1] ^ 1])},
        "another id": {"program_id": "affinity2"},
        "another kind": {"kind": "bcc-source"},
        "another version": {"version": good.version + 1},
    }
    fields = good.model_dump() | changes[case]
    fields["sha256"] = hashlib.sha256(fields["payload"]).hexdigest()  # as an attacker would
    message = LoadProgram.model_validate(fields)
    with pytest.raises(TrustRefused, match="unsigned" if case == "unsigned" else "does not verify"):
        policy.check(message)


def test_no_trusted_key_refuses_everything_unless_trust_any(tmp_path: Path) -> None:
    unsigned = _message(OBJECT, None, signature=b"x" * 64)
    with pytest.raises(TrustRefused, match="no trusted key"):
        TrustPolicy.from_config(tmp_path / "absent").check(unsigned)
    insecure = TrustPolicy.from_config(tmp_path / "absent", mode="any")
    assert insecure.check(unsigned)


def _rename_section(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert len(new) <= len(old)
    return payload.replace(old + b"\0", new + b"\0" * (len(old) - len(new) + 1))


def test_disallowed_attach_point_is_refused() -> None:
    kprobe = _rename_section(OBJECT, b"tracepoint/sched/sched_process_exit", b"kprobe/do_exit")
    policy = TrustPolicy(mode="any")
    assert "kprobe/do_exit" in attach_points("bpf-object", kprobe)
    with pytest.raises(TrustRefused, match="'kprobe/do_exit' is not allowed"):
        policy.inspect("bpf-object", kprobe)
    xdp = _rename_section(OBJECT, b"tracepoint/sched/sched_process_exit", b"xdp")
    with pytest.raises(TrustRefused, match="'xdp' is not allowed"):
        policy.inspect("bpf-object", xdp)
    # Configurable: an operator may admit kprobes explicitly.
    allow = ("tracepoint/*", "iter/task", "kprobe/*")
    assert TrustPolicy(mode="any", allow=allow).inspect("bpf-object", kprobe)


TP = "tracepoint/sched/sched_process_exit"


@pytest.mark.parametrize(
    ("programs", "maps", "reason"),
    [
        ([ProgramView("kprobe__do_exit", "kprobe/do_exit")], [], "'kprobe/do_exit' is not allowed"),
        ([ProgramView("lsm__bpf", "lsm/bpf")], [], "'lsm/bpf' is not allowed"),
        ([ProgramView("f", TP, frozenset({36}))], [], "calls bpf_probe_write_user"),
        ([ProgramView("f", TP, frozenset({109, 6}))], [], "calls bpf_send_signal"),
        ([ProgramView("f", TP, frozenset({KFUNC}))], [], "kfuncs\\) by an unknown name"),
        (
            [ProgramView("f", TP, kfuncs=frozenset({"bpf_send_signal_task"}))],
            [],
            "not in allow_kfuncs",
        ),
        ([ProgramView(".text", ".text", frozenset({58}))], [], "no attach point"),
        (
            [ProgramView("f", TP), ProgramView(".text", ".text", frozenset({58}))],
            [],
            "bpf_override_return",
        ),
        ([ProgramView("f", TP)], [MapView("m", 1, "/sys/fs/bpf/m")], "'m' is pinned"),
        ([ProgramView("f", TP)], [MapView("ops", 26)], "struct_ops"),
    ],
)
def test_vet_judges_programs_and_maps(
    programs: list[ProgramView], maps: list[MapView], reason: str
) -> None:
    with pytest.raises(TrustRefused, match=reason):
        TrustPolicy(mode="any").vet(programs, maps)


def test_vet_allow_lists_are_configurable() -> None:
    kfunc = ProgramView("f", TP, kfuncs=frozenset({"bpf_task_from_pid"}))
    pinned = MapView("m", 1, "/sys/fs/bpf/m")
    policy = TrustPolicy(mode="any", allow_kfuncs=("bpf_task_*",), allow_pinning=True)
    assert policy.vet([kfunc, ProgramView(".text", ".text")], [pinned]) == [TP]


def test_denied_helpers_in_objects_are_found() -> None:
    call = struct.pack("<BBhi", 0x85, 0, 0, 36)  # call bpf_probe_write_user
    ld64 = struct.pack("<BBhi", 0x18, 0, 0, 0) + struct.pack("<BBhi", 0, 0, 0, 0)
    kfunc = struct.pack("<BBhi", 0x85, 0x20, 0, 7)
    subprogram = struct.pack("<BBhi", 0x85, 0x10, 0, -1)  # a kfunc too, if relocated so
    callx = struct.pack("<BBhi", 0x8D, 0x01, 0, 0)
    assert helper_calls(ld64 + call + kfunc) == {36, KFUNC}
    assert helper_calls(subprogram) == set()
    assert helper_calls(subprogram, subprograms=False) == {KFUNC}  # bcc: no relocations
    assert helper_calls(callx) == {KFUNC}
    first = program_sections(OBJECT)[1]
    patched = OBJECT.replace(first.data, call + first.data[8:])
    with pytest.raises(TrustRefused, match="bpf_probe_write_user"):
        TrustPolicy(mode="any").inspect("bpf-object", patched)


@pytest.mark.parametrize(
    "payload", [b"", b"\x7fELF", b"\x7fELF" + bytes(60), OBJECT[:200], b"MZ" + OBJECT]
)
def test_malformed_objects_are_refused_cleanly(payload: bytes) -> None:
    with pytest.raises(ElfError):
        program_sections(payload)
    with pytest.raises(TrustRefused, match="not a valid eBPF object"):
        TrustPolicy(mode="any").inspect("bpf-object", payload)


def test_signing_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert signing.main(["keygen", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(SystemExit, match="1"):
        signing.main(["keygen", str(tmp_path / "k")])  # never overwrites a key
    assert "refusing to overwrite a key" in capsys.readouterr().err
    assert signing.main(["keygen", str(tmp_path / "k"), "--force"]) == 0
    assert "public key:" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # programs are signed by pvhost, over their envelope
        signing.main(["sign", str(tmp_path / "k" / "signing.pem")])


def test_version_book_refuses_older_versions_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "versions.json"
    book = VersionBook(path)
    book.check("affinity", 5)
    book.record("affinity", 5)
    book.check("affinity", 5)  # the host re-sends its current program: fine
    book.check("other", 1)  # ids are independent
    with pytest.raises(TrustRefused, match="older than version 5"):
        book.check("affinity", 4)
    again = VersionBook(path)  # an agent restart
    with pytest.raises(TrustRefused, match="older than version 5"):
        again.check("affinity", 4)
    path.write_text("{not json")
    assert VersionBook(path).get("affinity") is None  # unreadable: a warning, not a crash


KFUNC_SOURCE = """
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct task_struct { int pid; } __attribute__((preserve_access_index));
extern struct task_struct *bpf_task_from_pid(__s32 pid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;
static __attribute__((noinline)) int sub(int x) { return x + 1; }  /* a real subprogram */
SEC("tp/sched/sched_process_exit")
int probe(void *ctx)
{
    struct task_struct *task = bpf_task_from_pid(sub(0));

    if (task)
        bpf_task_release(task);
    return 0;
}
char LICENSE[] SEC("license") = "Dual BSD/GPL";
"""


def test_kfunc_calls_are_found_by_their_relocations(tmp_path: Path) -> None:
    """clang writes a kfunc call as ``call -1`` with src_reg 1, like a subprogram call: only
    the relocation to an undefined symbol tells them apart (built here with clang)."""
    src, obj = tmp_path / "k.bpf.c", tmp_path / "k.bpf.o"
    src.write_text(KFUNC_SOURCE)
    arch = subprocess.run(
        ["cc", "-print-multiarch"], capture_output=True, text=True, check=False
    ).stdout.strip()
    flags = ["-idirafter", f"/usr/include/{arch}"] if arch else []
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", *flags, "-c", str(src), "-o", str(obj)],
        check=True,
    )
    payload = obj.read_bytes()
    sections = {s.name: s for s in program_sections(payload)}
    probe = sections["tp/sched/sched_process_exit"]
    assert probe.extern_calls == {"bpf_task_from_pid", "bpf_task_release"}
    assert KFUNC not in helper_calls(probe.data)  # the subprogram call is not a kfunc
    with pytest.raises(TrustRefused, match="bpf_task_from_pid, bpf_task_release \\(kfuncs\\)"):
        TrustPolicy(mode="any").inspect("bpf-object", payload)
    allowed = TrustPolicy(mode="any", allow_kfuncs=("bpf_task_*",))
    assert allowed.inspect("bpf-object", payload) == ["tp/sched/sched_process_exit"]
