"""gRPC over one HTTP/2 stream (grpc/grpc PROTOCOL-HTTP2.md), server side.

A call's inbound DATA is cut into length-prefixed messages (1-byte compressed flag,
4-byte length); the handler reads them deserialized from `Call` (an async iterator)
and writes its answers with `Call.write`; its outcome becomes the `grpc-status` and
`grpc-message` trailers. The handler's interface is grpc.aio's, the part the servicers
use: `async for request in requests`, `await context.write(message)`,
`context.invocation_metadata()`, `await context.abort(code, details)`.

A peer reset (RST_STREAM, or the connection lost) cancels the handler's task, as
grpc.aio does, so its `except CancelledError` / `finally` run. A deadline
(`grpc-timeout`) or an oversized message ends the call with its status and cancels the
handler the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import grpc

from extproc.transport.connection import Stream, StreamClosed
from extproc.transport.frames import ErrorCode
from extproc.transport.headers import STATUS_200, Headers, literal, status

log = logging.getLogger(__name__)

_PREFIX = struct.Struct(">BL")
_RESPONSE_HEADERS = STATUS_200 + literal("content-type", "application/grpc")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Headers that are HTTP/2 or gRPC transport, not the caller's metadata.
_RESERVED = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "user-agent"})

# handler(requests, context): a coroutine that writes with context.write, or an async
# generator of the answers (both grpc.aio styles).
Handler = Callable[["Call", "Call"], Awaitable[None] | AsyncIterator[Any]]


@dataclass(frozen=True)
class Method:
    """One RPC: how to read its requests and write its answers, and its handler
    (`handler(requests, context)`, both the `Call`)."""

    deserialize: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    handler: Handler


class Abort(Exception):
    """Ends the call with a status (what `context.abort` raises, as grpc.aio does)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def code_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def trailers(code: grpc.StatusCode, details: str = "") -> bytes:
    if code is grpc.StatusCode.OK and not details:
        return _OK
    block = literal("grpc-status", str(code_number(code)))
    if details:
        block += literal("grpc-message", quote(details[:1024], safe=" !#$&'()*+,/:;=?@[]~"))
    return block


_OK = literal("grpc-status", "0")


def parse_timeout(value: str) -> float | None:
    """Seconds of a `grpc-timeout` value (e.g. `100m`), or None if malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


class Call:
    """One gRPC call: the request iterator and the servicer context in one object."""

    def __init__(self, stream: Stream, headers: Headers, method: Method, max_message: int) -> None:
        self.stream, self.method, self.max_message = stream, method, max_message
        self._headers = headers
        self._buf = bytearray()
        self._queue: collections.deque[bytes] = collections.deque()
        self._held = 0  # received bytes not yet credited back to the peer
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._sent_headers = False
        self._failure: tuple[grpc.StatusCode, str] | None = None  # set by _fail
        self._deadline: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._run())
        if timeout is not None:
            expired = grpc.StatusCode.DEADLINE_EXCEEDED
            self._deadline = loop.call_later(timeout, self._fail, expired, "deadline exceeded")

    # -- inbound (StreamHandler) ------------------------------------------------------

    def data(self, payload: bytes) -> None:
        pending = bool(self._queue)
        if self._buf or not self._one_message(payload):
            self._buf += payload
        if self._buf and not self._split():
            return
        if pending or self._queue:
            self._held += len(payload)  # the handler is behind: credit as it reads
        else:
            self.stream.credit(len(payload))
        self._wake()

    def _one_message(self, payload: bytes) -> bool:
        """Queue `payload` if it is exactly one whole message (Envoy's usual DATA)."""
        if len(payload) < 5:
            return False
        compressed, length = _PREFIX.unpack_from(payload)
        if compressed or len(payload) != 5 + length or length > self.max_message:
            return False
        self._queue.append(payload[5:])
        return True

    def _split(self) -> bool:
        """Queue the whole messages in the buffer; False if the call failed."""
        while len(self._buf) >= 5:
            compressed, length = _PREFIX.unpack_from(self._buf)
            if length > self.max_message:
                size = f"{length}-byte message, limit {self.max_message}"
                self._fail(grpc.StatusCode.RESOURCE_EXHAUSTED, size)
                return False
            if compressed:
                self._fail(grpc.StatusCode.UNIMPLEMENTED, "compressed messages not supported")
                return False
            if len(self._buf) < 5 + length:
                break
            self._queue.append(bytes(self._buf[5 : 5 + length]))
            del self._buf[: 5 + length]
        return True

    def end(self) -> None:
        self._ended = True
        self._wake()

    def reset(self) -> None:
        self._ended = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the handler's side --------------------------------------------------------------

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Any:
        while not self._queue:
            if self._ended:
                if self._buf:
                    await self.abort(grpc.StatusCode.INTERNAL, "truncated message")
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        raw = self._queue.popleft()
        if not self._queue and self._held:
            held, self._held = self._held, 0
            self.stream.credit(held)
        return self.method.deserialize(raw)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        # A list comprehension, not a generator: called on every call (server._is_attempt).
        return tuple([(k, v) for k, v in self._headers if k not in _RESERVED and k[:1] != ":"])

    async def write(self, message: Any) -> None:
        """Send one answer. On a stream the peer has reset (or that ended with a status)
        this raises CancelledError, as the reset's cancellation would at the next await."""
        payload = self.method.serialize(message)
        try:
            if not self._sent_headers:
                self._sent_headers = True
                self.stream.send_headers(_RESPONSE_HEADERS)
            data = _PREFIX.pack(0, len(payload)) + payload
            if not self.stream.send_frame(data):
                await self.stream.send_data(data)
        except StreamClosed:
            raise asyncio.CancelledError from None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Abort(code, details)

    # -- the call's life -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._handle()
        except Abort as exc:
            self._finish(exc.code, exc.details)
        except asyncio.CancelledError:
            if self._failure is None:
                raise  # the peer reset the stream (or the server is stopping)
            # else _fail has answered already and cancelled the handler
        except StreamClosed:
            pass  # the stream went away while we wrote
        except Exception:
            log.exception("gRPC handler failed (stream %d)", self.stream.id)
            self._finish(grpc.StatusCode.INTERNAL, "internal error")
        else:
            self._finish(grpc.StatusCode.OK)
        finally:
            if self._deadline is not None:
                self._deadline.cancel()

    async def _handle(self) -> None:
        """Run the handler; one written as an async generator has its answers written."""
        outcome = self.method.handler(self, self)
        if isinstance(outcome, AsyncIterator):
            async for message in outcome:
                await self.write(message)
        else:
            await outcome

    def _finish(self, code: grpc.StatusCode, details: str = "") -> None:
        block = trailers(code, details)
        if not self._sent_headers:
            block = _RESPONSE_HEADERS + block  # trailers-only
        with contextlib.suppress(StreamClosed):
            self.stream.send_headers(block, end_stream=True)

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with `code` now, whatever the handler is doing."""
        self._ended = True
        self._buf.clear()
        if self._failure is not None:
            return
        self._failure = (code, details)
        self._finish(code, details)
        if self.task is not None and not self.task.done():
            self.task.cancel()


def refuse(stream: Stream, code: grpc.StatusCode, details: str) -> None:
    """Answer a call that reaches no handler (unknown method, bad headers)."""
    try:
        stream.send_headers(_RESPONSE_HEADERS + trailers(code, details), end_stream=True)
    except StreamClosed:
        stream.reset(ErrorCode.CANCEL)


def reject_http(stream: Stream, http_status: int) -> None:
    """Answer a request that is not gRPC at all with a plain HTTP status."""
    stream.send_headers(status(http_status), end_stream=True)
