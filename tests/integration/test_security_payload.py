"""Hostile payloads against the real agent (issue #16, D12-D15).

Every attack is a real program built from C here (clang for objects, bcc for sources),
correctly signed by the host's trusted key, sent to the real :class:`~pvagent.agent.Agent`
over the protocol, and aimed at something the test owns: a victim process it started, a
pinned map it created. The test asserts the attack is refused *and* did no harm (the
victim lives, the map is unchanged, no pin is left).

On the code before the fix every one of these passed the agent's checks (see
bench/results/security.md): the kfunc program loaded and killed its victim, the pinned-map
program loaded and wrote the test's map, every bcc trick passed the textual checks (three
loaded; the kprobe and fentry ones reached the kernel and failed only because this host's
kernel cannot attach kprobes or fentry programs, which is why the tests ask for an
"untrusted:" refusal, not just any failure), a replayed message loaded under another id,
and nothing capped the number of programs.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from pvagent import libbpf_ctypes
from pvagent.agent import Agent, ProgramLimits
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvhost.programs import SignedProgram, sign_program
from pvproto import GuestTopology, Hello, ProgramKind, ProgramLoaded
from vmlab.hostpeer import HostEnd

pytestmark = [pytest.mark.security, pytest.mark.root, pytest.mark.ebpf]

TOPOLOGY = GuestTopology(online_vcpus=sorted(os.sched_getaffinity(0)))
ROOT = Path(__file__).resolve().parents[2]
_MULTIARCH = subprocess.run(
    ["cc", "-print-multiarch"], capture_output=True, text=True, check=False
).stdout.strip()
_ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)

#: Every attack object reports through a ring buffer, as the loaders require, so that on
#: the old code it would load fully.
RINGBUF = """
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } pv_sec SEC(".maps");
char LICENSE[] SEC("license") = "Dual BSD/GPL";
"""
HEADERS = "#include <linux/types.h>\n#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
#: The kernel's own declarations (libbpf checks an extern kfunc's prototype against the
#: kernel's BTF: a forward-declared struct or an int for an enum would not match).
KFUNCS = """
struct task_struct { int pid; } __attribute__((preserve_access_index));
enum pid_type { PIDTYPE_PID };
extern struct task_struct *bpf_task_from_pid(__s32 pid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(host private key, guest trusted.d holding its public key)."""
    root = tmp_path_factory.mktemp("keys")
    private, public = signing.generate_keypair(root / "host")
    trusted = root / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    return private, trusted


def build(tmp_path: Path, source: str, name: str = "prog") -> bytes:
    """Compile ``source`` (after the common headers) into a CO-RE object, as bpf/ does."""
    src = tmp_path / f"{name}.bpf.c"
    src.write_text(HEADERS + source.replace("KFUNC_DECLS", KFUNCS))
    out = tmp_path / f"{name}.bpf.o"
    cmd = ["clang", "-O2", "-g", "-Wall", "-target", "bpf", f"-D__TARGET_ARCH_{_ARCH}"]
    if _MULTIARCH:
        cmd += ["-idirafter", f"/usr/include/{_MULTIARCH}"]
    subprocess.run([*cmd, "-c", str(src), "-o", str(out)], check=True, capture_output=True)
    return out.read_bytes()


def signed(
    key: Path, program_id: str, kind: ProgramKind, payload: bytes, version: int | None = None
) -> SignedProgram:
    """A program the host signed, as pvhost would send it."""
    return sign_program(program_id, kind, payload, key, version=version)


def run_agent(
    policy: TrustPolicy,
    body: Callable[[Agent, HostEnd], Awaitable[None]],
    **agent_options: object,
) -> None:
    """The real agent, connected to a test host over a socketpair, around ``body``."""

    async def main() -> None:
        agent = Agent(TOPOLOGY, policy, **agent_options)  # type: ignore[arg-type]
        host, reader, writer = await HostEnd.pair()
        task = asyncio.create_task(agent.serve(reader, writer))
        try:
            await host.expect(Hello)
            host.hello()
            await asyncio.wait_for(body(agent, host), 120)
        finally:
            host.close()
            await task
            agent.close()

    asyncio.run(main())


async def verdict_of(host: HostEnd, program: SignedProgram, request_id: int) -> ProgramLoaded:
    host.send(program.message(request_id=request_id))
    verdict = await host.expect(ProgramLoaded, timeout=60)
    assert verdict.request_id == request_id
    return verdict


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process of our own that calls getppid() in a loop: the only target of the attacks
    that send signals (each program checks for its pid), so nothing else can be hurt."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nwhile True:\n os.getppid(); time.sleep(0.005)"]
    )
    yield proc
    proc.kill()
    proc.wait()


def survives(proc: subprocess.Popen[bytes], seconds: float = 0.5) -> bool:
    """Whether ``proc`` is still alive after ``seconds`` of getppid() calls (ours too)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        os.getppid()
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return proc.poll() is None


# -- D12: kfunc calls ---------------------------------------------------------------------


KFUNC_KILL = """
KFUNC_DECLS
extern int bpf_send_signal_task(struct task_struct *task, int sig, enum pid_type type,
                                __u64 value) __ksym;

SEC("tp/syscalls/sys_enter_getppid")
int kill_victim(void *ctx)
{
    struct task_struct *task = bpf_task_from_pid(VICTIM);

    if (!task)
        return 0;
    bpf_send_signal_task(task, 9, PIDTYPE_PID, 0);
    bpf_task_release(task);
    return 0;
}
"""


def test_d12_a_kfunc_call_is_refused_and_its_victim_lives(
    keys: tuple[Path, Path], tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    private, trusted = keys
    obj = build(tmp_path, f"#define VICTIM {victim.pid}\n" + KFUNC_KILL + RINGBUF)

    async def body(agent: Agent, host: HostEnd) -> None:
        verdict = await verdict_of(host, signed(private, "kfunc", "bpf-object", obj), 1)
        assert not verdict.ok
        assert "bpf_send_signal_task" in verdict.reason and "allow_kfuncs" in verdict.reason
        assert agent.programs == {}
        assert await asyncio.to_thread(survives, victim)  # while the agent runs

    run_agent(TrustPolicy.from_config(trusted), body)


def test_d12_an_allow_listed_kfunc_loads(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """The allow-list works on names: a harmless kfunc admitted by name loads."""
    private, trusted = keys
    obj = build(
        tmp_path,
        """
KFUNC_DECLS

SEC("tp/syscalls/sys_enter_getppid")
int look(void *ctx)
{
    struct task_struct *task = bpf_task_from_pid(1);

    if (task)
        bpf_task_release(task);
    return 0;
}
"""
        + RINGBUF,
    )
    policy = TrustPolicy.from_config(
        trusted, allow_kfuncs=("bpf_task_from_pid", "bpf_task_release")
    )

    async def body(agent: Agent, host: HostEnd) -> None:
        verdict = await verdict_of(host, signed(private, "look", "bpf-object", obj), 1)
        assert verdict.ok, verdict.reason + verdict.log

    run_agent(policy, body)


# -- D14: pinned maps ------------------------------------------------------------------------


PIN_WRITE = """
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} MAP_NAME SEC(".maps");

SEC("tp/syscalls/sys_enter_getppid")
int scribble(void *ctx)
{
    __u32 zero = 0;
    __u64 evil = 0xdead;

    bpf_map_update_elem(&MAP_NAME, &zero, &evil, BPF_ANY);
    return 0;
}
"""


class PinnedMap:
    """Another application's map, pinned in bpffs (BPF_MAP_TYPE_ARRAY, u32 → u64, 1 entry)."""

    def __init__(self, name: str) -> None:
        lib = libbpf_ctypes.lib()
        lib.bpf_map_create.restype = ctypes.c_int
        lib.bpf_map_create.argtypes = (
            [ctypes.c_int, ctypes.c_char_p] + [ctypes.c_uint32] * 3 + [ctypes.c_void_p]
        )
        lib.bpf_obj_pin.restype = ctypes.c_int
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        self.path = Path("/sys/fs/bpf") / name
        self.fd = lib.bpf_map_create(2, name.encode(), 4, 8, 1, None)  # BPF_MAP_TYPE_ARRAY
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        libbpf_ctypes.map_update(self.fd, bytes(4), (7).to_bytes(8, "little"))
        assert lib.bpf_obj_pin(self.fd, str(self.path).encode()) == 0

    def value(self) -> int:
        raw = libbpf_ctypes.map_lookup(self.fd, bytes(4), 8)
        assert raw is not None
        return int.from_bytes(raw, "little")

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _map_name() -> str:
    return f"pvsec{secrets.token_hex(4)}"  # ≤ 15 characters: a kernel map name


def test_d14_a_program_cannot_write_another_applications_pinned_map(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, trusted = keys
    name = _map_name()
    theirs = PinnedMap(name)
    try:
        obj = build(tmp_path, f"#define MAP_NAME {name}\n" + PIN_WRITE + RINGBUF)

        async def body(agent: Agent, host: HostEnd) -> None:
            verdict = await verdict_of(host, signed(private, "pin", "bpf-object", obj), 1)
            assert not verdict.ok and f"map '{name}' is pinned" in verdict.reason
            os.getppid()  # would run the program, had it been loaded
            assert theirs.value() == 7

        run_agent(TrustPolicy.from_config(trusted), body)
    finally:
        theirs.close()


def test_d14_a_refused_pin_is_not_created_and_an_allowed_one_ends_with_its_program(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, trusted = keys
    name = _map_name()
    pin = Path("/sys/fs/bpf") / name
    obj = build(tmp_path, f"#define MAP_NAME {name}\n" + PIN_WRITE + RINGBUF)
    try:

        async def refused(agent: Agent, host: HostEnd) -> None:
            verdict = await verdict_of(host, signed(private, "pin", "bpf-object", obj), 1)
            assert not verdict.ok and "allow_pinning" in verdict.reason

        run_agent(TrustPolicy.from_config(trusted), refused)
        assert not pin.exists()

        async def allowed(agent: Agent, host: HostEnd) -> None:
            verdict = await verdict_of(host, signed(private, "pin", "bpf-object", obj), 2)
            assert verdict.ok, verdict.reason + verdict.log
            assert pin.exists()
            agent.unload("pin")
            assert not pin.exists()  # its pin does not outlive it

        run_agent(TrustPolicy.from_config(trusted, allow_pinning=True), allowed)
    finally:
        pin.unlink(missing_ok=True)


# -- D13: bcc sources are judged on their bytecode -------------------------------------------

BCC_PROLOGUE = "BPF_RINGBUF_OUTPUT(pv_sec, 1);\n"
_ONLY_VICTIM = "if ((bpf_get_current_pid_tgid() >> 32) != VICTIM) return 0;"
BCC_TRICKS = {
    # A comment between a probe's name and its '(' hid it from the old regular expressions.
    "comment": """
int kprobe__do_nanosleep /* not a probe, says the regex */ (struct pt_regs *ctx) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }
""",
    # Token pasting builds the helper's name; the text never holds it.
    "token pasting": f"""
#define PASTE(a, b) a##b
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{
    {_ONLY_VICTIM}
    PASTE(bpf_send_, signal)(9);
    return 0;
}}
""",
    # The helper by its enum constant.
    "BPF_FUNC constant": f"""
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{
    {_ONLY_VICTIM}
    ((long (*)(u32))BPF_FUNC_send_signal)(9);
    return 0;
}}
""",
    # The helper by its number (117: bpf_send_signal_thread).
    "literal helper id": f"""
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{
    {_ONLY_VICTIM}
    ((long (*)(u32))117)(9);
    return 0;
}}
""",
    # bcc auto-attaches kfunc__* as fentry programs; a macro builds the name.
    "macro-built kfunc__ name": """
#define ENTRY(f) kfunc__ ## f
int ENTRY(do_nanosleep)(u64 *ctx) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }
""",
}
BCC_REASONS = {
    "comment": "'kprobe/do_nanosleep' is not allowed",
    "token pasting": "calls bpf_send_signal",
    "BPF_FUNC constant": "calls bpf_send_signal",
    "literal helper id": "calls bpf_send_signal_thread",
    "macro-built kfunc__ name": "'fentry/do_nanosleep' is not allowed",
}


@pytest.mark.parametrize("trick", list(BCC_TRICKS))
def test_d13_bcc_tricks_are_judged_on_the_compiled_bytecode(
    keys: tuple[Path, Path], victim: subprocess.Popen[bytes], trick: str
) -> None:
    private, trusted = keys
    source = f"#define VICTIM {victim.pid}\n{BCC_PROLOGUE}{BCC_TRICKS[trick]}".encode()

    async def body(agent: Agent, host: HostEnd) -> None:
        verdict = await verdict_of(host, signed(private, "trick", "bcc-source", source), 1)
        assert not verdict.ok, f"{trick}: loaded"
        assert verdict.reason.startswith("untrusted:") and BCC_REASONS[trick] in verdict.reason
        assert agent.programs == {}
        assert await asyncio.to_thread(survives, victim)  # while the agent runs

    run_agent(TrustPolicy.from_config(trusted), body)


def test_d13_bcc_pinned_tables_are_refused_and_leave_no_pin(keys: tuple[Path, Path]) -> None:
    private, trusted = keys
    pin = Path("/sys/fs/bpf") / _map_name()
    source = f"""{BCC_PROLOGUE}
BPF_TABLE_PINNED("array", u32, u64, shared, 1, "{pin}");
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{ return 0; }}
""".encode()
    try:

        async def body(agent: Agent, host: HostEnd) -> None:
            verdict = await verdict_of(host, signed(private, "pinned", "bcc-source", source), 1)
            assert not verdict.ok and "'shared' is pinned" in verdict.reason

        run_agent(TrustPolicy.from_config(trusted), body)
        assert not pin.exists()
    finally:
        pin.unlink(missing_ok=True)


# -- D15: replay, versions, caps -------------------------------------------------------------

BENIGN = """
SEC("tp/syscalls/sys_enter_getppid")
int benign(void *ctx) { return VERSION; }
"""


def test_d15_a_captured_program_is_refused_under_another_id_and_an_old_version(
    keys: tuple[Path, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    private, trusted = keys
    old = signed(
        private,
        "probe",
        "bpf-object",
        build(tmp_path, "#define VERSION 1\n" + BENIGN + RINGBUF, "v1"),
    )
    new = signed(
        private,
        "probe",
        "bpf-object",
        build(tmp_path, "#define VERSION 2\n" + BENIGN + RINGBUF, "v2"),
    )
    assert new.version > old.version
    versions = tmp_path_factory.mktemp("state") / "versions.json"

    async def body(agent: Agent, host: HostEnd) -> None:
        assert (await verdict_of(host, old, 1)).ok
        # The captured message, under another id: its signature no longer verifies.
        fields = old.message().model_dump() | {"program_id": "probe2"}
        host.send(type(old.message()).model_validate(fields).model_copy(update={"request_id": 2}))
        verdict = await host.expect(ProgramLoaded)
        assert not verdict.ok and "does not verify" in verdict.reason
        assert (await verdict_of(host, new, 3)).ok
        verdict = await verdict_of(host, old, 4)  # the old version, replayed
        assert not verdict.ok and "older than version" in verdict.reason
        assert list(agent.programs) == ["probe"]
        assert agent.programs["probe"].sha256 == new.message().sha256

    run_agent(TrustPolicy.from_config(trusted), body, versions_file=versions)

    async def after_restart(agent: Agent, host: HostEnd) -> None:
        verdict = await verdict_of(host, old, 1)
        assert not verdict.ok and "older than version" in verdict.reason

    run_agent(TrustPolicy.from_config(trusted), after_restart, versions_file=versions)


def test_d15_the_number_and_memory_of_loaded_programs_are_capped(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, trusted = keys
    obj = build(tmp_path, "#define VERSION 1\n" + BENIGN + RINGBUF)

    async def count(agent: Agent, host: HostEnd) -> None:
        for i in range(2):
            assert (
                await verdict_of(host, signed(private, f"copy{i}", "bpf-object", obj), i + 1)
            ).ok
        verdict = await verdict_of(host, signed(private, "copy2", "bpf-object", obj), 3)
        assert not verdict.ok and "too many programs" in verdict.reason
        assert "max_programs" in verdict.reason and sorted(agent.programs) == ["copy0", "copy1"]
        # Replacing a loaded program under its id is not one more.
        again = build(tmp_path, "#define VERSION 2\n" + BENIGN + RINGBUF, "again")
        assert (await verdict_of(host, signed(private, "copy1", "bpf-object", again), 4)).ok

    run_agent(TrustPolicy.from_config(trusted), count, limits=ProgramLimits(max_programs=2))

    sizes: list[int] = []

    async def memory(agent: Agent, host: HostEnd) -> None:
        assert (await verdict_of(host, signed(private, "first", "bpf-object", obj), 1)).ok
        sizes.append(agent.programs["first"].program.memory_bytes)
        assert sizes[0] > 0
        verdict = await verdict_of(host, signed(private, "second", "bpf-object", obj), 2)
        assert not verdict.ok and "max_program_memory_mib" in verdict.reason
        assert list(agent.programs) == ["first"]

    # Room for one copy, not two (the cap is measured, not guessed: one load first).
    async def measure(agent: Agent, host: HostEnd) -> None:
        assert (await verdict_of(host, signed(private, "m", "bpf-object", obj), 1)).ok
        sizes.append(agent.programs["m"].program.memory_bytes)

    run_agent(TrustPolicy.from_config(trusted), measure)
    limit = ProgramLimits(max_memory_bytes=sizes.pop() * 3 // 2)
    run_agent(TrustPolicy.from_config(trusted), memory, limits=limit)
