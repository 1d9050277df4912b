"""The agent's commands as an operator runs them: ``pvagent trace affinity --json`` and
``pvagent run --unix`` against a host that restarts. The agent knows no record layout: the
test decodes the affinity records with the host's decoder, as pvhost does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import tty
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.port import open_stream
from pvhost.services.affinity_event import AffinityEvent, EventKind, decode
from pvproto import (
    GuestDocument,
    Hello,
    LoadProgram,
    Ping,
    Pong,
    ProgramLoaded,
    ProgramRecords,
)
from vmlab.hostpeer import HostEnd

pytestmark = [pytest.mark.root, pytest.mark.ebpf]
ROOT = Path(__file__).resolve().parents[2]


def test_trace_json_prints_one_line_per_successful_call(_ebpf_ready: None) -> None:
    trace = subprocess.Popen(
        [sys.executable, "-m", "pvagent", "trace", "affinity", "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert trace.stderr is not None and trace.stdout is not None
        assert "tracing" in trace.stderr.readline()
        tid: list[int] = []

        def work() -> None:
            tid.append(threading.get_native_id())
            os.sched_setaffinity(0, {0})
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {999})  # fails: not reported

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        lines = []
        while True:
            line = json.loads(trace.stdout.readline())
            assert line["ringbuf"] == "pv_affinity" and line["size"] == len(line["hex"]) // 2
            event = decode(bytes.fromhex(line["hex"]))
            if event.tgid == os.getpid():
                lines.append(event)
                if event.kind is EventKind.EXIT and event.tid == tid[0]:
                    break
        assert [(e.kind, e.target_tid, sorted(e.cpus)) for e in lines] == [
            (EventKind.SET, tid[0], [0]),
            (EventKind.EXIT, tid[0], []),
        ]
    finally:
        trace.send_signal(signal.SIGINT)
        assert trace.wait(10) == 0
        for pipe in (trace.stdout, trace.stderr):
            if pipe is not None:
                pipe.close()


def test_run_unix_serves_a_restarting_host(tmp_path: Path, _ebpf_ready: None) -> None:
    sock = tmp_path / "agent.sock"
    config = tmp_path / "pvagent.toml"
    config.write_text(
        f'trust = "any"\nbcc_cache_dir = "{tmp_path}/cache"\ndocuments_dir = "{tmp_path}/run"\n'
    )

    async def body() -> None:
        connections: asyncio.Queue[HostEnd] = asyncio.Queue()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await connections.put(HostEnd(reader, writer))

        server = await asyncio.start_unix_server(accept, str(sock))
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvagent", "run", "--unix", str(sock), "--config", str(config),
            cwd=ROOT, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            host = await asyncio.wait_for(connections.get(), 20)
            assert (await host.expect(Hello)).topology is not None
            host.hello()
            payload = bpfobj.read("affinity.bpf.o")
            host.send(LoadProgram.for_payload("affinity", "bpf-object", payload, request_id=2))
            assert (await host.expect(ProgramLoaded)).ok
            host.close()  # the host restarts: the agent reconnects and says Hello again
            host = await asyncio.wait_for(connections.get(), 20)
            await host.expect(Hello)
            host.hello()
            host.send(GuestDocument(name="placement", content='{"seq": 1}'))
            host.send(Ping(nonce=3))
            await host.expect(Pong)
            assert (tmp_path / "run" / "placement.json").read_text() == '{"seq": 1}\n'
            cpus = sorted(os.sched_getaffinity(0))
            done = threading.Event()
            tid: list[int] = []

            def pin() -> None:
                tid.append(threading.get_native_id())
                os.sched_setaffinity(0, {cpus[-1]})
                done.wait(10)

            async def events() -> list[AffinityEvent]:
                batch = await host.expect(ProgramRecords)
                assert (batch.program_id, batch.ringbuf) == ("affinity", "pv_affinity")
                return [decode(r) for r in batch.records]

            thread = threading.Thread(target=pin)
            thread.start()
            try:  # the program stayed loaded across the host's restart: its records come
                while (EventKind.SET, tid[0], frozenset({cpus[-1]})) not in {
                    (e.kind, e.target_tid, e.cpus) for e in await events()
                }:
                    pass
            finally:
                done.set()
                thread.join()
            while (EventKind.EXIT, tid[0]) not in {(e.kind, e.tid) for e in await events()}:
                pass
            host.close()
        finally:
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), 10) == 0
            server.close()

    asyncio.run(asyncio.wait_for(body(), 60))


@pytest.mark.root
def test_run_device_speaks_over_a_character_device(tmp_path: Path) -> None:
    """``--device`` on a real character device (a raw pty standing in for the virtio port)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    config = tmp_path / "pvagent.toml"
    config.write_text('trust = "any"\n')

    async def body() -> None:
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvagent", "run", "--device", os.ttyname(slave),
            "--config", str(config), cwd=ROOT, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        reader, writer, rtransport = await open_stream(master)  # the host end of the pty
        host = HostEnd(reader, writer)
        try:
            assert (await host.expect(Hello, timeout=20)).role == "guest"
            host.hello()
            host.send(Ping(nonce=77))
            assert (await host.expect(Pong)).nonce == 77
        finally:
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), 10) == 0
            writer.transport.abort()
            rtransport.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 40))
    finally:
        os.close(master)
        os.close(slave)
