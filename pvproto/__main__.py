"""``python -m pvproto``: a self-check of the wire protocol over a real socket pair.

Sends a guest Hello, an AffinityUpdate and a LoadProgram across a unix socket
pair with noise and a truncated frame injected, and prints what the decoder
recovers. Exit status 0 means every valid frame came through in order.
"""

from __future__ import annotations

import socket
import sys

from pvproto import (
    AffinityUpdate,
    FrameDecoder,
    GuestTopology,
    Hello,
    LoadProgram,
    ProtocolError,
    ThreadRequest,
    encode,
)


def main() -> int:
    sent = [
        Hello(
            role="guest",
            protocol_versions=[1],
            software_version="demo",
            topology=GuestTopology(online_vcpus=[0, 1, 2, 3], sibling_groups=[[0, 1], [2, 3]]),
        ),
        AffinityUpdate(
            seq=1,
            wanted=[0, 1],
            threads=[ThreadRequest(tid=101, vcpus=[0]), ThreadRequest(tid=102, vcpus=[1])],
        ),
        LoadProgram.for_payload("affinity", "bpf-object", b"\x7fELF" + bytes(64)),
    ]
    noise = b"\xe5PV" + b"line noise \xff\x00"
    stream = encode(sent[0]) + noise + encode(sent[1])[:9] + encode(sent[1]) + encode(sent[2])
    left, right = socket.socketpair()
    with left, right:
        left.sendall(stream)
        left.shutdown(socket.SHUT_WR)
        decoder = FrameDecoder()
        got: list[object] = []
        while chunk := right.recv(7):  # small reads: framing must not care
            got += decoder.feed(chunk)
    for item in got:
        kind = "error  " if isinstance(item, ProtocolError) else "message"
        print(f"{kind} {type(item).__name__}: {str(item)[:100]}")
    recovered = [m for m in got if not isinstance(m, ProtocolError)]
    ok = recovered == sent
    print("all valid frames recovered in order" if ok else "LOST FRAMES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
