"""One HTTP/2 server connection (RFC 9113) as an asyncio protocol.

It reads frames, keeps the streams' states and both directions' flow-control windows,
and hands each stream the peer opens to the application (`App.open`), which gets the
stream's decoded headers and then its DATA payloads (`StreamHandler`). The application
writes through `Stream`: headers, flow-controlled data, trailers, reset.

What a gRPC server needs and no more: no server push, PRIORITY ignored, our own
header blocks are literals (no dynamic table). Frames we send are queued and written
together once per event-loop turn (`_flush`), so a reply's HEADERS and DATA, or many
streams' replies, leave in one system call.

Flow control: we advertise large windows and give the peer its credit back as the
application takes what arrived (`Stream.credit`), so a handler that stops reading stops
the peer within one window. Sending waits for the peer's windows and for the socket
buffer to drain (`pause_writing`), so a slow reader never makes us buffer a whole body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, cast

from extproc.transport import frames as f
from extproc.transport.frames import ConnectionFault, ErrorCode, Flag, FrameType, StreamFault
from extproc.transport.headers import HeaderDecoder, Headers

log = logging.getLogger(__name__)
_LINGER = 1.0  # seconds a failed connection reads (and drops) input before closing
_FLUSH_AT = 256 * 1024  # queued bytes written at once rather than at the end of the turn


class StreamHandler(Protocol):
    """What the application does with one stream's inbound side."""

    def data(self, payload: bytes) -> None: ...

    def end(self) -> None: ...

    def reset(self) -> None: ...


class App(Protocol):
    def open(self, stream: Stream, headers: Headers) -> StreamHandler: ...


class Limits:
    """The connection's own settings (what we advertise) and its buffer bounds."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 100_000,
        stream_window: int = 16 * 1024 * 1024,
        connection_window: int = 64 * 1024 * 1024,
        max_frame_size: int = 1024 * 1024,
        max_header_list_size: int = 64 * 1024,
    ) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_frame_size = max_frame_size
        self.max_header_list_size = max_header_list_size

    def settings(self) -> bytes:
        return f.settings(
            {
                f.Setting.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
                f.Setting.INITIAL_WINDOW_SIZE: self.stream_window,
                f.Setting.MAX_FRAME_SIZE: self.max_frame_size,
                f.Setting.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
            }
        )


class StreamClosed(Exception):
    """The stream (or its connection) is gone: nothing more can be sent on it."""


class Stream:
    """One stream the peer opened, as the application sees it."""

    __slots__ = (
        "conn",
        "handler",
        "id",
        "local_closed",
        "recv_window",
        "remote_closed",
        "send_window",
        "unacked",
    )

    def __init__(self, stream_id: int, conn: Connection) -> None:
        self.id = stream_id
        self.conn = conn
        self.handler: StreamHandler | None = None
        self.send_window = conn.peer_initial_window
        self.recv_window = conn.limits.stream_window
        self.unacked = 0
        self.remote_closed = False
        self.local_closed = False

    def send_headers(self, block: bytes, end_stream: bool = False) -> None:
        self.conn.send_headers(self, block, end_stream)

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        await self.conn.send_data(self, data, end_stream)

    def send_frame(self, data: bytes) -> bool:
        """`data` as one DATA frame now, if nothing need wait (see Connection.send_frame)."""
        return self.conn.send_frame(self, data)

    def reset(self, code: ErrorCode) -> None:
        self.conn.reset_stream(self, code)

    def credit(self, size: int) -> None:
        """`size` bytes the application has taken: the peer may send that much more."""
        self.conn.credit(self, size)


class Connection(asyncio.Protocol):
    def __init__(self, app: App, limits: Limits, on_close: Callable[[Connection], None]) -> None:
        self.app, self.limits, self._on_close = app, limits, on_close
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.send_window = f.DEFAULT_WINDOW
        self.recv_window = limits.connection_window
        self._unacked = 0
        self._decoder = HeaderDecoder(limits.max_header_list_size)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._queued = 0  # bytes in _out
        self._buf = bytearray()
        self._need = len(f.PREFACE)
        self._preface = True
        self._settled = False  # the peer's first SETTINGS arrived
        self._continued: tuple[int, int, list[bytes]] | None = None
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self._goaway_sent = False
        self._shut = False  # our side is shut (after a connection error)
        self.closed = False

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        increase = self.limits.connection_window - f.DEFAULT_WINDOW
        self._write(self.limits.settings() + f.window_update(0, increase))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # after a connection error: dropped until the socket closes
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf.clear()
        try:
            used = self._parse(data)
        except ConnectionFault as exc:
            self.fail(exc.code, str(exc))
            return
        if used < len(data):
            self._buf += memoryview(data)[used:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in list(self.streams.values()):
            self._forget(stream, notify=True)
        self._wake()
        self._on_close(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # -- reading ----------------------------------------------------------------------

    def _parse(self, data: bytes) -> int:
        """Handle every complete frame in `data`; the offset of the first byte left over."""
        pos, size = 0, len(data)
        if self._preface:
            if size < len(f.PREFACE):
                self._need = len(f.PREFACE)
                return 0
            if data[: len(f.PREFACE)] != f.PREFACE:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 connection preface")
            self._preface, pos = False, len(f.PREFACE)
        while not self.closed:
            if size - pos < f.HEADER_SIZE:
                self._need = f.HEADER_SIZE
                break
            length, kind, flags, stream_id = f.parse_header(data, pos)
            if length > self.limits.max_frame_size:
                raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, f"{length}-byte frame")
            end = pos + f.HEADER_SIZE + length
            if end > size:
                self._need = f.HEADER_SIZE + length
                break
            self._frame(kind, flags, stream_id, data[pos + f.HEADER_SIZE : end])
            pos = end
        return pos

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if not self._settled and kind != FrameType.SETTINGS:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
        if self._continued is not None and kind != FrameType.CONTINUATION:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
        handler = self._HANDLERS.get(kind)
        if handler is None:
            return  # unknown frame types are ignored (RFC 9113 4.1)
        try:
            handler(self, flags, stream_id, payload)
        except StreamFault as exc:
            log.debug("HTTP/2 stream %d reset: %s", exc.stream_id, exc)
            self._reset_id(exc.stream_id, exc.code)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length")
        for key, value in f.parse_settings(payload):
            self._apply_setting(key, value)
        self._settled = True
        self._write(f.SETTINGS_ACK)

    def _apply_setting(self, key: int, value: int) -> None:
        if key == f.Setting.INITIAL_WINDOW_SIZE:
            if value > f.MAX_WINDOW:
                raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE")
            delta, self.peer_initial_window = value - self.peer_initial_window, value
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > f.MAX_WINDOW:
                    raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
            self._wake()
        elif key == f.Setting.MAX_FRAME_SIZE:
            if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE")
            self.peer_max_frame = value
        elif key == f.Setting.ENABLE_PUSH and value > 1:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH")
        # HEADER_TABLE_SIZE: we never index what we send; MAX_CONCURRENT_STREAMS: we open
        # none; MAX_HEADER_LIST_SIZE: our blocks are small. Unknown settings are ignored.

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "PING length")
        if not flags & Flag.ACK:
            self._write(f.ping_ack(payload))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length")
        # The peer opens no more streams; the ones it has finish. Close when none remain.
        self.goaway()

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = f.u32(payload) & f.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        else:
            self._stream_window_update(stream_id, increment)
        self._wake()

    def _stream_window_update(self, stream_id: int, increment: int) -> None:
        self._check_not_idle(stream_id)
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # closed: a late update is harmless
        if increment == 0:
            raise StreamFault(stream_id, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            raise StreamFault(stream_id, ErrorCode.FLOW_CONTROL_ERROR, "window overflow")

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length")
        self._check_not_idle(stream_id)
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._forget(stream, notify=True)

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise StreamFault(stream_id, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY length")

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self._check_not_idle(stream_id)
        size = len(payload)
        if size > self.recv_window:
            raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the window")
        self.recv_window -= size
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            self._credit_connection(size)  # discarded: give the connection credit back
            if stream is not None:
                raise StreamFault(stream_id, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
            return
        if size > stream.recv_window:
            raise StreamFault(stream_id, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the window")
        stream.recv_window -= size
        data = f.strip_padding(stream_id, flags, payload)
        if len(data) < size:
            self.credit(stream, size - len(data))
        if data and stream.handler is not None:
            stream.handler.data(data)
        if flags & Flag.END_STREAM:
            self._remote_end(stream)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = f.strip_padding(stream_id, flags, payload)
        if flags & Flag.PRIORITY:
            if len(block) < 5:
                raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "HEADERS priority")
            block = block[5:]
        if flags & Flag.END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self._continued = (stream_id, flags, [block])
            self._check_block_size(len(block))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continued is None or self._continued[0] != stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        parts = self._continued[2]
        parts.append(payload)
        self._check_block_size(sum(map(len, parts)))
        if flags & Flag.END_HEADERS:
            _, first_flags, _ = self._continued
            self._continued = None
            self._header_block(stream_id, first_flags, b"".join(parts))

    def _check_block_size(self, size: int) -> None:
        if size > 4 * self.limits.max_header_list_size:
            raise ConnectionFault(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decoder.decode(block)  # always: it keeps the HPACK state in step
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._trailers(stream, flags)
        elif stream_id <= self.last_stream_id:
            # A stream we reset or finished: the peer may have sent this before it saw
            # that, so it is ignored (RFC 9113 5.1, "closed").
            log.debug("HTTP/2 HEADERS on closed stream %d ignored", stream_id)
        elif stream_id % 2 == 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, f"even stream id {stream_id}")
        else:
            self.last_stream_id = stream_id
            if not self._goaway_sent:
                self._open(stream_id, flags, headers)

    def _trailers(self, stream: Stream, flags: int) -> None:
        if stream.remote_closed:
            raise StreamFault(stream.id, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")
        if not flags & Flag.END_STREAM:
            raise StreamFault(stream.id, ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM")
        self._remote_end(stream)

    def _open(self, stream_id: int, flags: int, headers: Headers) -> None:
        if len(self.streams) >= self.limits.max_concurrent_streams:
            raise StreamFault(stream_id, ErrorCode.REFUSED_STREAM, "too many streams")
        stream = Stream(stream_id, self)
        self.streams[stream_id] = stream
        stream.handler = self.app.open(stream, headers)
        if flags & Flag.END_STREAM and stream_id in self.streams:
            self._remote_end(stream)

    def _check_not_idle(self, stream_id: int) -> None:
        if stream_id > self.last_stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, f"frame on idle stream {stream_id}")

    def _remote_end(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.handler is not None:
            stream.handler.end()
        if stream.local_closed:
            self._forget(stream, notify=False)

    _HANDLERS: dict[int, Callable[[Connection, int, int, bytes], None]] = {
        FrameType.DATA: _on_data,
        FrameType.HEADERS: _on_headers,
        FrameType.PRIORITY: _on_priority,
        FrameType.RST_STREAM: _on_rst_stream,
        FrameType.SETTINGS: _on_settings,
        FrameType.PUSH_PROMISE: _on_push_promise,
        FrameType.PING: _on_ping,
        FrameType.GOAWAY: _on_goaway,
        FrameType.WINDOW_UPDATE: _on_window_update,
        FrameType.CONTINUATION: _on_continuation,
    }

    # -- receive credit ------------------------------------------------------------------

    def credit(self, stream: Stream, size: int) -> None:
        self._credit_connection(size)
        if stream.remote_closed or stream.id not in self.streams:
            return
        stream.unacked += size
        if stream.unacked >= self.limits.stream_window // 2:
            self._write(f.window_update(stream.id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _credit_connection(self, size: int) -> None:
        self._unacked += size
        if self._unacked >= self.limits.connection_window // 2:
            self._write(f.window_update(0, self._unacked))
            self.recv_window += self._unacked
            self._unacked = 0

    # -- writing ---------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._shut:
            return  # after a connection error nothing more is sent
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)
        self._queued += len(data)

    def _flush(self) -> None:
        out, self._out, self._queued = self._out, [], 0
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None:
        if stream.local_closed or stream.id not in self.streams:
            raise StreamClosed(f"stream {stream.id} is closed")
        flags = Flag.END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        first, rest = block[:limit], block[limit:]
        more = bool(rest)
        self._write(
            f.frame(FrameType.HEADERS, flags | (0 if more else Flag.END_HEADERS), stream.id, first)
        )
        while rest:
            part, rest = rest[:limit], rest[limit:]
            last = Flag.END_HEADERS if not rest else 0
            self._write(f.frame(FrameType.CONTINUATION, last, stream.id, part))
        if end_stream:
            self._local_end(stream)

    def send_frame(self, stream: Stream, data: bytes) -> bool:
        """Send `data` as one DATA frame now if the windows, the frame size and the socket
        allow it (a gRPC reply usually does); False if not (then `send_data` waits). Saves
        the coroutine, the loop and a second queued write per message."""
        size = len(data)
        if (
            self._paused
            or size > self.send_window
            or size > stream.send_window
            or size > self.peer_max_frame
            or self.closed
            or stream.local_closed
            or stream.id not in self.streams
        ):
            return False
        self._write(f.frame_head(FrameType.DATA, 0, stream.id, size) + data)
        stream.send_window -= size
        self.send_window -= size
        if self._queued > _FLUSH_AT:
            self._flush()  # as send_data does, so pause_writing can stop a big one
        return True

    async def send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        view, pos = memoryview(data), 0
        while True:
            if self.closed or stream.id not in self.streams or stream.local_closed:
                raise StreamClosed(f"stream {stream.id} is closed")
            windows = min(stream.send_window, self.send_window)
            room = max(0, min(len(data) - pos, windows, self.peer_max_frame))
            if self._paused or (room <= 0 and pos < len(data)):
                await self._wait()
                continue
            last = pos + room == len(data)
            flags = Flag.END_STREAM if (last and end_stream) else 0
            self._write(f.frame_head(FrameType.DATA, flags, stream.id, room))
            self._write(bytes(view[pos : pos + room]) if room < len(data) else data)
            stream.send_window -= room
            self.send_window -= room
            pos += room
            if self._queued > _FLUSH_AT:
                self._flush()  # a big body goes out as it is framed, so pause_writing can stop it
            if last:
                break
        if end_stream:
            self._local_end(stream)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _local_end(self, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream, notify=False)
        else:
            # The answer is complete; tell the peer to stop sending (RFC 9113 8.1).
            self._write(f.rst_stream(stream.id, ErrorCode.NO_ERROR))
            self._forget(stream, notify=False)

    def reset_stream(self, stream: Stream, code: ErrorCode) -> None:
        if stream.id in self.streams:
            self._write(f.rst_stream(stream.id, code))
            self._forget(stream, notify=False)

    def _reset_id(self, stream_id: int, code: ErrorCode) -> None:
        self._write(f.rst_stream(stream_id, code))
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._forget(stream, notify=True)

    def _forget(self, stream: Stream, *, notify: bool) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        stream.local_closed = True
        if notify and stream.handler is not None:
            stream.handler.reset()
        self._wake()
        if self._goaway_sent and not self.streams:
            self._close_soon()

    # -- ending ------------------------------------------------------------------------------

    def goaway(self) -> None:
        """Graceful shutdown: no new streams; close once the open ones have finished."""
        if not self._goaway_sent:
            self._goaway_sent = self._send_goaway(ErrorCode.NO_ERROR)
        if not self.streams:
            self._close_soon()

    def _send_goaway(self, code: ErrorCode, reason: str = "") -> bool:
        self._write(f.goaway(self.last_stream_id, code, reason.encode()[:256]))
        return True

    def fail(self, code: ErrorCode, reason: str) -> None:
        """A connection error: GOAWAY with `code`, then close (RFC 9113 5.4.1).

        Our side is shut and what the peer still sends is read and dropped for a moment
        before the socket closes: closing with unread input makes the kernel answer RST,
        which can destroy the GOAWAY before the peer reads it."""
        log.warning("HTTP/2 connection error %s: %s", code.name, reason)
        self._goaway_sent = self._send_goaway(code, reason)
        self.closed = True
        self._flush()
        self._shut = True
        transport = self._transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER, transport.close)

    def _close_soon(self) -> None:
        def close() -> None:
            self._flush()
            if self._transport is not None:
                self._transport.close()

        asyncio.get_running_loop().call_soon(close)

    def abort(self) -> None:
        """Close now, without waiting for open streams."""
        if self._transport is not None:
            self._flush()
            self._transport.close()
