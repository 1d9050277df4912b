"""Trust before load: signatures against trusted.d keys, attach-point and helper allow-list."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.elf import ElfError, helper_calls, program_sections
from pvagent.errors import TrustRefused
from pvagent.trust import TrustPolicy, attach_points
from pvhost import signing

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


def test_signed_object_is_accepted(keys: tuple[Path, Path, Path]) -> None:
    private, trusted, _ = keys
    policy = TrustPolicy.from_config(trusted)
    assert len(policy.keys) == 1 and policy.problems
    points = policy.check("bpf-object", OBJECT, signing.sign(OBJECT, private))
    assert points == [
        "tracepoint/syscalls/sys_enter_sched_setaffinity",
        "tracepoint/syscalls/sys_exit_sched_setaffinity",
        "tracepoint/sched/sched_process_fork",
        "tracepoint/sched/sched_process_exit",
    ]
    assert policy.check("bcc-source", BCC, signing.sign(BCC, private)) == points


@pytest.mark.parametrize("case", ["unsigned", "unknown key", "tampered"])
def test_bad_signatures_are_refused(keys: tuple[Path, Path, Path], case: str) -> None:
    private, trusted, stranger = keys
    policy = TrustPolicy.from_config(trusted)
    payload, signature = OBJECT, signing.sign(OBJECT, private)
    if case == "unsigned":
        signature = b""
    elif case == "unknown key":
        signature = signing.sign(OBJECT, stranger)
    else:
        payload = OBJECT[:-1] + bytes([OBJECT[-1] ^ 1])
    with pytest.raises(TrustRefused, match="unsigned" if case == "unsigned" else "does not verify"):
        policy.check("bpf-object", payload, signature)


def test_no_trusted_key_refuses_everything_unless_trust_any(tmp_path: Path) -> None:
    with pytest.raises(TrustRefused, match="no trusted key"):
        TrustPolicy.from_config(tmp_path / "absent").check("bpf-object", OBJECT, b"x" * 64)
    insecure = TrustPolicy.from_config(tmp_path / "absent", mode="any")
    assert insecure.check("bpf-object", OBJECT, b"")


def _rename_section(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert len(new) <= len(old)
    return payload.replace(old + b"\0", new + b"\0" * (len(old) - len(new) + 1))


def test_disallowed_attach_point_is_refused() -> None:
    kprobe = _rename_section(OBJECT, b"tracepoint/sched/sched_process_exit", b"kprobe/do_exit")
    policy = TrustPolicy(mode="any")
    assert "kprobe/do_exit" in attach_points("bpf-object", kprobe)
    with pytest.raises(TrustRefused, match="'kprobe/do_exit' is not allowed"):
        policy.check("bpf-object", kprobe, b"")
    xdp = _rename_section(OBJECT, b"tracepoint/sched/sched_process_exit", b"xdp")
    with pytest.raises(TrustRefused, match="'xdp' is not allowed"):
        policy.check("bpf-object", xdp, b"")
    # Configurable: an operator may admit kprobes explicitly.
    assert TrustPolicy(mode="any", allow=("tracepoint/*", "kprobe/*")).check(
        "bpf-object", kprobe, b""
    )


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("int kprobe__do_exit(void *ctx) { return 0; }", "'kprobe/do_exit' is not allowed"),
        ("LSM_PROBE(bpf, int cmd) { return 0; }", "'lsm/bpf/int cmd' is not allowed"),
        (
            "TRACEPOINT_PROBE(a, b) { bpf_probe_write_user(0, 0, 0); return 0; }",
            "bpf_probe_write_user",
        ),
        ("int helper(void *ctx) { return 0; }", "no attach point"),
    ],
)
def test_bcc_sources_are_vetted(source: str, reason: str) -> None:
    with pytest.raises(TrustRefused, match=reason):
        TrustPolicy(mode="any").check("bcc-source", source.encode(), b"")


def test_denied_helpers_in_objects_are_found() -> None:
    call = struct.pack("<BBhi", 0x85, 0, 0, 36)  # call bpf_probe_write_user
    ld64 = struct.pack("<BBhi", 0x18, 0, 0, 0) + struct.pack("<BBhi", 0, 0, 0, 0)
    kfunc = struct.pack("<BBhi", 0x85, 0x20, 0, 7)
    assert helper_calls(ld64 + call + kfunc) == {36, "kfunc"}
    first = program_sections(OBJECT)[1]
    patched = OBJECT.replace(first.data, call + first.data[8:])
    with pytest.raises(TrustRefused, match="bpf_probe_write_user"):
        TrustPolicy(mode="any").check("bpf-object", patched, b"")


@pytest.mark.parametrize(
    "payload", [b"", b"\x7fELF", b"\x7fELF" + bytes(60), OBJECT[:200], b"MZ" + OBJECT]
)
def test_malformed_objects_are_refused_cleanly(payload: bytes) -> None:
    with pytest.raises(ElfError):
        program_sections(payload)
    with pytest.raises(TrustRefused, match="not a valid eBPF object"):
        TrustPolicy(mode="any").check("bpf-object", payload, b"")


def test_signing_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert signing.main(["keygen", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(SystemExit, match="1"):
        signing.main(["keygen", str(tmp_path / "k")])  # never overwrites a key
    assert "refusing to overwrite a key" in capsys.readouterr().err
    target = tmp_path / "prog.o"
    target.write_bytes(OBJECT)
    assert signing.main(["sign", str(target), "--key", str(tmp_path / "k" / "signing.key")]) == 0
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "k.pem").write_bytes((tmp_path / "k" / "signing.pem").read_bytes())
    signature = (tmp_path / "prog.o.sig").read_bytes()
    assert TrustPolicy.from_config(trusted).check("bpf-object", OBJECT, signature)
    with pytest.raises(SystemExit, match="1"):
        signing.main(["sign", str(target), "--key", str(tmp_path / "nokey")])
    assert "pvhost.signing: cannot read the signing key" in capsys.readouterr().err
