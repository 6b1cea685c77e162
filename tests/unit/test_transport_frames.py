"""extproc.transport against hand-built HTTP/2 frames over a loopback socket: the
connection's framing, HPACK, flow control, errors (GOAWAY / RST_STREAM) and the gRPC
call's status, deadline, message limit and cancellation."""

from __future__ import annotations

import asyncio
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import hpack
import pytest

from extproc.transport import Call, GrpcServer, Method
from extproc.transport import frames as f
from extproc.transport.frames import ErrorCode, Flag, FrameType
from extproc.transport.grpc import parse_timeout, trailers
from extproc.transport.headers import HeaderDecoder, literal

Frame = tuple[int, int, int, bytes]
ECHO, SLOW, BIG, SINK, HUGE = "/t.T/Echo", "/t.T/Slow", "/t.T/Big", "/t.T/Sink", "/t.T/Huge"
_LIMIT = 64 * 1024


class Events:
    """What the test handlers saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.metadata: tuple[tuple[str, str], ...] = ()


async def echo(requests: Call, context: Call) -> None:
    async for request in requests:
        await context.write(request)


def slow(events: Events) -> Callable[[Call, Call], Awaitable[None]]:
    async def handler(requests: Call, context: Call) -> None:
        events.metadata = context.invocation_metadata()
        events.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.cancelled.set()
            raise

    return handler


async def big(requests: Call, context: Call) -> None:
    async for _ in requests:
        await context.write(b"b" * 100_000)


async def huge(requests: Call, context: Call) -> None:
    async for _ in requests:
        await context.write(b"h" * (40 * 1024 * 1024))


async def sink(requests: Call, context: Call) -> None:
    total = 0
    async for request in requests:
        total += len(request)
    await context.write(str(total).encode())


def _method(handler: Any) -> Method:
    return Method(bytes, bytes, handler)


@pytest.fixture
async def server() -> AsyncIterator[tuple[GrpcServer, int, Events]]:
    events = Events()
    methods = {ECHO: _method(echo), SLOW: _method(slow(events)), BIG: _method(big)}
    methods[SINK] = _method(sink)
    methods[HUGE] = _method(huge)
    grpc_server = GrpcServer(methods, max_message=_LIMIT)
    port = await grpc_server.listen("127.0.0.1", 0)
    yield grpc_server, port, events
    await grpc_server.stop(0.5)


class Peer:
    """A raw HTTP/2 client: writes frames, reads frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: bytes | None = None) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        peer.send(f.PREFACE + (settings if settings is not None else f.settings({})))
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> Frame:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length, kind, flags, stream_id = f.parse_header(head, 0)
        payload = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return kind, flags, stream_id, payload

    async def until(self, kind: int, stream_id: int | None = None) -> Frame:
        for _ in range(100):
            frame = await self.frame()
            if frame[0] == kind and (stream_id is None or frame[2] == stream_id):
                return frame
        raise AssertionError(f"no frame of type {kind}")

    def headers(self, stream_id: int, path: str, extra: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path)]
        fields += [(":authority", "t"), ("content-type", "application/grpc"), ("te", "trailers")]
        return self.encoder.encode(fields + list(extra))

    def open(self, stream_id: int, path: str, extra: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        block = self.headers(stream_id, path, extra)
        self.send(f.frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, block))

    async def status(self, stream_id: int) -> dict[str, str]:
        """The decoded header block that ends `stream_id` (trailers)."""
        for _ in range(100):
            kind, flags, sid, payload = await self.frame()
            if kind == FrameType.HEADERS and sid == stream_id:
                fields = {str(k): str(v) for k, v in self.decoder.decode(payload)}
                if flags & Flag.END_STREAM:
                    return fields
        raise AssertionError("no trailers")

    async def closed(self) -> bool:
        try:
            for _ in range(100):
                await self.frame()
        except asyncio.IncompleteReadError:
            return True
        return False

    def close(self) -> None:
        self.writer.close()


def message(payload: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BL", compressed, len(payload)) + payload


def data(stream_id: int, payload: bytes, end: bool = True) -> bytes:
    return f.frame(FrameType.DATA, Flag.END_STREAM if end else 0, stream_id, payload)


async def goaway_code(peer: Peer) -> int:
    _, _, _, payload = await peer.until(FrameType.GOAWAY)
    return int(struct.unpack(">LL", payload[:8])[1])


# -- connection set-up ----------------------------------------------------------------------


async def test_settings_are_exchanged_and_acknowledged(server: Any) -> None:
    _, port, _ = server
    peer = await Peer.connect(port)
    kind, flags, _, payload = await peer.frame()
    assert (kind, flags) == (FrameType.SETTINGS, 0)
    ours = dict(f.parse_settings(payload))
    assert ours[f.Setting.INITIAL_WINDOW_SIZE] >= 1024 * 1024
    assert (await peer.frame())[0] == FrameType.WINDOW_UPDATE  # a large connection window
    kind, flags, _, _ = await peer.until(FrameType.SETTINGS)
    assert flags & Flag.ACK
    peer.send(f.frame(FrameType.PING, 0, 0, b"12345678"))
    kind, flags, _, payload = await peer.until(FrameType.PING)
    assert flags & Flag.ACK
    assert payload == b"12345678"
    peer.close()


@pytest.mark.parametrize(
    ("bytes_sent", "code"),
    [
        (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" + b"x" * 20, ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(FrameType.PING, 0, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(FrameType.SETTINGS, 0, 1), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(FrameType.SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
        (
            f.PREFACE + f.settings({f.Setting.INITIAL_WINDOW_SIZE: 1 << 31}),
            ErrorCode.FLOW_CONTROL_ERROR,
        ),
        (f.PREFACE + f.settings({f.Setting.MAX_FRAME_SIZE: 100}), ErrorCode.PROTOCOL_ERROR),
    ],
)
async def test_malformed_connection_start_is_a_goaway(
    server: Any, bytes_sent: bytes, code: ErrorCode
) -> None:
    _, port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = Peer(reader, writer)
    peer.send(bytes_sent)
    assert await goaway_code(peer) == code
    assert await peer.closed()


async def _ready(port: int, settings: bytes | None = None) -> Peer:
    peer = await Peer.connect(port, settings)
    await peer.until(FrameType.SETTINGS)
    return peer


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (f.frame(FrameType.HEADERS, Flag.END_HEADERS, 1, b"\xff\xff\xff\xff"), "COMPRESSION"),
        (data(3, message(b"x")), "PROTOCOL"),  # DATA on an idle stream
        (f.frame(FrameType.DATA, 0, 0, b"x"), "PROTOCOL"),
        (f.frame(FrameType.HEADERS, Flag.END_HEADERS, 2, b"\x82"), "PROTOCOL"),  # even id
        (f.frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, b"\x82"), "PROTOCOL"),
        (f.frame(FrameType.PUSH_PROMISE, Flag.END_HEADERS, 1, b"\0\0\0\2"), "PROTOCOL"),
        (f.frame(FrameType.PING, 0, 0, b"1234"), "FRAME_SIZE"),
        (f.window_update(0, 0), "PROTOCOL"),
        (f.window_update(0, f.MAX_WINDOW), "FLOW_CONTROL"),
        (f.frame(FrameType.DATA, 0, 1, b"x" * (2 << 20)), "FRAME_SIZE"),  # > our max frame
    ],
)
async def test_protocol_errors_are_a_goaway_with_their_code(
    server: Any, frame: bytes, code: str
) -> None:
    _, port, _ = server
    peer = await _ready(port)
    peer.send(frame)
    assert ErrorCode(await goaway_code(peer)).name == f"{code}_ERROR"
    assert await peer.closed()


async def test_headers_interrupted_by_another_frame_is_a_goaway(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    block = peer.headers(1, ECHO)
    peer.send(f.frame(FrameType.HEADERS, 0, 1, block[:3]) + f.frame(FrameType.PING, 0, 0, b"8" * 8))
    assert await goaway_code(peer) == ErrorCode.PROTOCOL_ERROR


# -- calls ---------------------------------------------------------------------------------------


async def test_padded_continued_headers_and_padded_data_reach_the_handler(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    block = peer.headers(1, ECHO)
    padded = bytes([4]) + block[:5] + b"\0" * 4
    peer.send(f.frame(FrameType.HEADERS, Flag.PADDED, 1, padded))
    peer.send(f.frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, block[5:]))
    body = message(b"hello")
    peer.send(f.frame(FrameType.DATA, Flag.PADDED | Flag.END_STREAM, 1, b"\x03" + body + b"\0" * 3))
    _, _, _, payload = await peer.until(FrameType.DATA, 1)
    assert payload == message(b"hello")
    assert (await peer.status(1))["grpc-status"] == "0"


async def test_the_same_header_block_decodes_the_same_from_the_cache() -> None:
    encoder, decoder = hpack.Encoder(), HeaderDecoder(64 * 1024)
    fields = [(":path", ECHO), ("x-gateway-attempt", "1")]
    first, again = encoder.encode(fields), encoder.encode(fields)
    assert decoder.decode(first) == fields
    assert decoder.decode(again) == fields == decoder.decode(again)
    assert literal("grpc-status", "0") == b"\x00\x0bgrpc-status\x010"


async def test_unknown_method_and_non_grpc_requests_are_refused(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    peer.open(1, "/t.T/Nope")
    fields = await peer.status(1)
    assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    block = peer.encoder.encode([(":method", "POST"), (":path", ECHO), ("content-type", "text/x")])
    peer.send(f.frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, 3, block))
    assert (await peer.status(3))[":status"] == "415"


async def test_oversized_message_is_resource_exhausted(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    peer.open(1, ECHO)
    peer.send(data(1, struct.pack(">BL", 0, _LIMIT + 1), end=False))
    fields = await peer.status(1)
    assert fields["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


async def test_compressed_message_is_unimplemented(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    peer.open(1, ECHO)
    peer.send(data(1, message(b"zz", compressed=1)))
    assert (await peer.status(1))["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


async def test_reset_mid_request_cancels_the_handler(server: Any) -> None:
    _, port, events = server
    peer = await _ready(port)
    peer.open(1, SLOW, [("x-gateway-attempt", "2"), ("traceparent", "00-ab-cd-01")])
    await asyncio.wait_for(events.started.wait(), 5)
    assert ("x-gateway-attempt", "2") in events.metadata
    assert all(not key.startswith(":") and key != "te" for key, _ in events.metadata)
    peer.send(f.rst_stream(1, ErrorCode.CANCEL))
    await asyncio.wait_for(events.cancelled.wait(), 5)


async def test_grpc_timeout_ends_the_call_deadline_exceeded(server: Any) -> None:
    _, port, events = server
    peer = await _ready(port)
    peer.open(1, SLOW, [("grpc-timeout", "50m")])
    fields = await peer.status(1)
    assert fields["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    await asyncio.wait_for(events.cancelled.wait(), 5)


async def test_sending_respects_the_peers_windows_and_frame_size(server: Any) -> None:
    _, port, _ = server
    settings = f.settings({f.Setting.INITIAL_WINDOW_SIZE: 30_000})
    peer = await _ready(port, settings)
    peer.open(1, BIG)
    peer.send(data(1, message(b"go")))
    received = 0
    for _ in range(10):  # the connection window (65,535) allows 30,000 on this stream
        kind, _, _sid, payload = await peer.frame()
        if kind == FrameType.DATA:
            assert len(payload) <= f.DEFAULT_MAX_FRAME
            received += len(payload)
        if received == 30_000:
            break
    assert received == 30_000
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(peer.until(FrameType.DATA), 0.2)
    peer.send(f.window_update(1, 200_000) + f.window_update(0, 200_000))
    while received < 100_005:
        kind, _, _, payload = await peer.frame()
        received += len(payload) if kind == FrameType.DATA else 0
    assert (await peer.status(1))["grpc-status"] == "0"


async def test_received_data_is_credited_back(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    peer.open(1, SINK)
    chunk = message(b"c" * 60_000)
    for _ in range(400):  # 24 MB: beyond the first stream and connection windows
        peer.send(data(1, chunk, end=False))
        await peer.writer.drain()
    peer.send(data(1, b""))
    updates, answer = 0, b""
    for _ in range(2000):
        kind, flags, _sid, payload = await peer.frame()
        updates += kind == FrameType.WINDOW_UPDATE
        answer = payload[5:] if kind == FrameType.DATA else answer
        if kind == FrameType.HEADERS and flags & Flag.END_STREAM:
            break
    assert updates >= 2
    assert answer == str(400 * 60_000).encode()


async def test_graceful_stop_finishes_open_calls_and_refuses_new_ones(server: Any) -> None:
    grpc_server, port, _ = server
    peer = await _ready(port)
    peer.open(1, ECHO)
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(grpc_server.stop(5))
    _, _, _, payload = await peer.until(FrameType.GOAWAY)
    assert struct.unpack(">LL", payload[:8]) == (1, ErrorCode.NO_ERROR)
    peer.open(3, ECHO)  # after the GOAWAY: ignored
    peer.send(data(1, message(b"last")))
    _, _, sid, payload = await peer.until(FrameType.DATA)
    assert (sid, payload) == (1, message(b"last"))
    assert (await peer.status(1))["grpc-status"] == "0"
    assert await peer.closed()
    await asyncio.wait_for(stopping, 5)


async def test_a_reader_that_stops_reading_is_not_buffered_for(server: Any) -> None:
    """With every window open, a 40 MiB answer to a peer that reads nothing stays in the
    kernel's socket buffers and a bounded user-space buffer, not all in memory."""
    grpc_server, port, _ = server
    settings = f.settings({f.Setting.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
    peer = await _ready(port, settings)
    peer.send(f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW))
    peer.open(1, HUGE)
    peer.send(data(1, message(b"go")))
    await asyncio.sleep(0.5)
    (conn,) = grpc_server.connections
    assert conn._transport is not None
    buffered = conn._transport.get_write_buffer_size() + conn._queued
    assert buffered < 4 * 1024 * 1024
    received = 0
    while received < 40 * 1024 * 1024:
        kind, _, _, payload = await peer.frame()
        received += len(payload) if kind == FrameType.DATA else 0
    assert (await peer.status(1))["grpc-status"] == "0"


async def test_headers_on_a_finished_stream_are_ignored(server: Any) -> None:
    _, port, _ = server
    peer = await _ready(port)
    peer.open(1, ECHO)
    peer.send(data(1, message(b"one")))
    assert (await peer.status(1))["grpc-status"] == "0"
    trailers = peer.encoder.encode([("x-late", "1")])
    peer.send(f.frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, 1, trailers))
    peer.open(3, ECHO)
    peer.send(data(3, message(b"two")))
    assert (await peer.status(3))["grpc-status"] == "0"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("100m", 0.1), ("2S", 2.0), ("1H", 3600.0), ("5u", 5e-6), ("x", None), ("123456789S", None)],
)
def test_grpc_timeout_values(value: str, seconds: float | None) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


def test_long_trailer_values_round_trip_through_hpack() -> None:
    details = "phases out of order: " + "x" * 300 + " 100% ünïcode"
    fields = [
        (str(k), str(v))
        for k, v in hpack.Decoder().decode(trailers(grpc.StatusCode.INTERNAL, details))
    ]
    assert fields[0] == ("grpc-status", "13")
    assert fields[1][0] == "grpc-message"
    assert urllib.parse.unquote(fields[1][1]) == details
