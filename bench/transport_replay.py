"""The ext_proc transport's own CPU per request, in-process: no Envoy, no sockets.

Feeds one HTTP/2 connection, frame by frame as Envoy sends them, into
`extproc.transport` (`Connection` and `GrpcServer`): per request one stream opened with
the header block Envoy 1.40's gRPC client sends (recorded: indexed fields and `:path` as
an unindexed Huffman literal), then the four ext_proc messages of bench/inproc_ab.py (a
2 KB request and answer), each after the reply to the one before. The handler is a null
ext_proc (parse each message, answer it with a constant reply, end the call after the
response body), so what is counted is HTTP/2 framing, HPACK, the gRPC call and protobuf
parsing: the per-request floor under the gateway's own work. Replies go to a transport
that only counts bytes.

    PYTHONHASHSEED=0 PYTHONPATH=. valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/cg.out .venv/bin/python bench/transport_replay.py \\
        -n 200 --callgrind
    grep totals /tmp/cg.out     # / 200 = instructions per request

Without --callgrind it prints CPU µs per request (time.process_time; noisy on a shared
machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import time

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from inproc_ab import messages

from extproc import server
from extproc.server import install_event_loop_policy
from extproc.transport import Call, GrpcServer
from extproc.transport import frames as f
from extproc.transport.connection import Connection
from extproc.transport.frames import Flag, FrameType

# Envoy's gRPC client's header blocks for the ext_proc call (tests/unit/test_transport_hpack.py).
FIRST_BLOCK = bytes.fromhex(
    "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d872150841852f"
    "94d761c98640027465864d833505b11f5f8b1d75d0620d263d4c4d6564408cf2b16aee7f4b1aa496ca8747"
    "834d9697408bf2b4a7b3c0ec90b22d29ec870be25c0b89717f"
)
NEXT_BLOCK = bytes.fromhex(
    "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508c286c1c0bfbe"
)
REPLY = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


async def null(requests: Call, context: Call) -> None:
    async for request in requests:
        await context.write(REPLY)
        if request.WhichOneof("request") == "response_body":
            break


class Sink:
    """The socket side: counts what the connection writes."""

    def __init__(self) -> None:
        self.written = 0

    def writelines(self, data: list[bytes]) -> None:
        self.written += sum(map(len, data))

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def stream_frames(stream_id: int, request: int) -> list[bytes]:
    """What Envoy sends for one request: HEADERS + the first message, then one message
    per reply."""
    block = FIRST_BLOCK if stream_id == 1 else NEXT_BLOCK
    out = []
    for message in messages(request):
        payload = message.SerializeToString()
        data = struct.pack(">BL", 0, len(payload)) + payload
        out.append(f.frame(FrameType.DATA, 0, stream_id, data))
    out[0] = f.frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, block) + out[0]
    return out


async def replay(conn: Connection, sink: Sink, frames: list[list[bytes]]) -> None:
    for stream in frames:
        for chunk in stream:
            before = sink.written
            conn.data_received(chunk)
            for _ in range(100):  # until the reply is out (bounded)
                await asyncio.sleep(0)
                if sink.written > before and not conn._out:
                    break


def _instrument(state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True)


async def run(n: int, callgrind: bool) -> float:
    grpc_server = GrpcServer({server.PROCESS: server.process_method(null)}, max_message=1 << 24)
    conn = Connection(grpc_server, grpc_server.limits, lambda _: None)
    sink = Sink()
    conn.connection_made(sink)  # type: ignore[arg-type]
    # Envoy's windows are large (its stream window 256 MiB by default); give ours the most.
    windows = f.settings({f.Setting.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
    conn.data_received(f.PREFACE + windows + f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW))
    warm = [stream_frames(2 * i + 1, i) for i in range(50)]
    timed = [stream_frames(2 * (i + 50) + 1, i) for i in range(n)]
    await replay(conn, sink, warm)
    if callgrind:
        _instrument("on")
    started = time.process_time()
    await replay(conn, sink, timed)
    elapsed = time.process_time() - started
    if callgrind:
        _instrument("off")
    if conn.streams or grpc_server.calls:
        raise SystemExit(f"{len(conn.streams)} streams still open")
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="requests (streams) replayed")
    parser.add_argument("--callgrind", action="store_true", help="instrument the replay only")
    args = parser.parse_args()
    install_event_loop_policy()
    per_request = asyncio.run(run(args.n, args.callgrind))
    print(f"{per_request:.1f} µs CPU/request (transport + null handler)", flush=True)


if __name__ == "__main__":
    main()
