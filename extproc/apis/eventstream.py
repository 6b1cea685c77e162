"""AWS event-stream framing (`application/vnd.amazon.eventstream`): incremental decoder
and encoder with no I/O, in the style of h11 (the SSE twin is `extproc.apis.sse`).

Bedrock's InvokeModelWithResponseStream answers in this framing. One message is:

    total length  uint32 BE   the whole message, prelude and trailing CRC included
    headers len   uint32 BE
    prelude CRC   uint32 BE   CRC32 of the 8 bytes above
    headers       name-len uint8, name UTF-8, type uint8, value (per type, below)
    payload       total - headers - 16 bytes
    message CRC   uint32 BE   CRC32 of every byte before it (prelude CRC included)

Header value types: 0 true, 1 false (no value bytes), 2 int8, 3 int16, 4 int32,
5 int64, 6 bytes (uint16 length), 7 UTF-8 string (uint16 length), 8 timestamp (int64
milliseconds since the epoch), 9 UUID (16 bytes). Integers decode as `Int` and
timestamps as `Timestamp`, so that a decoded message re-encodes byte for byte.

Chunk boundaries mean nothing: a prelude, a header or a CRC may be split across
chunks. The prelude CRC is checked as soon as 12 bytes are in, so a corrupt length
never makes the decoder wait for (or buffer) a message that will not come. Any
corruption (bad CRC, impossible lengths, an unknown header type, a duplicate
header) raises `EventStreamError`; a stream cannot be resynchronised after one.

Bedrock wraps each Anthropic stream event as a `chunk` event whose JSON payload is
`{"bytes": "<base64 of the event JSON>"}` (the real service adds a random-length
`"p"` field as padding against length side channels; it is ignored). Errors mid-stream
are `:message-type: exception` messages whose `:exception-type` names the error.
"""

from __future__ import annotations

import base64
import binascii
import functools
import struct
import types
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import orjson

from extproc.apis.sse import SseEvent
from extproc.errors import AnswerWithheld

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "EVENT_STREAM",
    "BedrockEventParser",
    "EventMessage",
    "EventStreamDecoder",
    "EventStreamError",
    "EventStreamFraming",
    "HeaderValue",
    "Int",
    "Timestamp",
    "chunk_payload",
    "encode_bedrock_event",
    "encode_chunk",
    "encode_exception",
    "encode_message",
]

CONTENT_TYPE = "application/vnd.amazon.eventstream"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_MAX_HEADERS_BYTES = 128 * 1024  # the AWS limit (botocore enforces the same)
_PRELUDE = struct.Struct(">III")
_PRELUDE_LEN = 12
_MIN_MESSAGE = _PRELUDE_LEN + 4


class EventStreamError(ValueError):
    """The bytes are not a valid event stream (bad CRC, length, header) or broke a limit."""


@dataclass(frozen=True, slots=True)
class Int:
    """An integer header value with its wire width (types 2-5)."""

    value: int
    bits: Literal[8, 16, 32, 64] = 32


@dataclass(frozen=True, slots=True)
class Timestamp:
    """A timestamp header value (type 8): milliseconds since the Unix epoch."""

    millis: int


HeaderValue = bool | Int | Timestamp | bytes | str | uuid.UUID


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One decoded message: its headers (in wire order) and payload bytes."""

    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""

    def header(self, name: str) -> str | None:
        """A string header's value; None when absent or not a string."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None

    @property
    def message_type(self) -> str | None:
        """`event`, `exception` or `error` (`:message-type`)."""
        return self.header(":message-type")

    @property
    def event_type(self) -> str | None:
        return self.header(":event-type")


_INT_FORMATS: dict[int, tuple[str, Literal[8, 16, 32, 64]]] = {
    2: (">b", 8),
    3: (">h", 16),
    4: (">i", 32),
    5: (">q", 64),
}
_INT_TYPES = {bits: (kind, fmt) for kind, (fmt, bits) in _INT_FORMATS.items()}


class EventStreamDecoder:
    """Turns chunks of an event-stream body into `EventMessage`s; see the module docstring."""

    __slots__ = ("_buffer", "_max_message_bytes", "_need", "_start")

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._start = 0  # where the next message begins in _buffer
        self._need = 0  # total length of the message at _start, once its prelude is checked

    def feed(self, chunk: bytes) -> list[EventMessage]:
        """Consume `chunk`; return the messages it completed, in order."""
        self._buffer += chunk
        messages: list[EventMessage] = []
        while True:
            if not self._need:
                if len(self._buffer) - self._start < _PRELUDE_LEN:
                    break
                self._need = self._check_prelude()
            if len(self._buffer) - self._start < self._need:
                break
            end = self._start + self._need
            messages.append(_decode_message(memoryview(self._buffer)[self._start : end]))
            self._start, self._need = end, 0
        if self._start:
            del self._buffer[: self._start]  # amortised: once per feed, not per message
            self._start = 0
        return messages

    def close(self) -> None:
        """End of stream: `EventStreamError` when it ended inside a message."""
        pending = len(self._buffer) - self._start
        if pending:
            raise EventStreamError(f"event stream ended inside a message ({pending} bytes left)")

    def _check_prelude(self) -> int:
        total, headers_len, crc = _PRELUDE.unpack_from(self._buffer, self._start)
        prelude = memoryview(self._buffer)[self._start : self._start + 8]
        if zlib.crc32(prelude) != crc:
            raise EventStreamError(
                "event stream prelude CRC mismatch (corrupt or not an event stream)"
            )
        if total < _MIN_MESSAGE or headers_len > total - _MIN_MESSAGE:
            raise EventStreamError(
                f"event stream message lengths are impossible ({total}, {headers_len})"
            )
        if total > self._max_message_bytes or headers_len > _MAX_HEADERS_BYTES:
            raise EventStreamError(f"event stream message of {total} bytes exceeds the limit")
        return int(total)


def _decode_message(raw: memoryview) -> EventMessage:
    """One whole message (prelude already checked): verify its CRC, parse headers."""
    (expected,) = struct.unpack_from(">I", raw, len(raw) - 4)
    if zlib.crc32(raw[:-4]) != expected:
        raise EventStreamError("event stream message CRC mismatch (corrupt message)")
    headers_len = struct.unpack_from(">I", raw, 4)[0]
    headers_end = _PRELUDE_LEN + headers_len
    headers = _decode_headers_cached(bytes(raw[_PRELUDE_LEN:headers_end]))
    return EventMessage(headers=headers, payload=bytes(raw[headers_end:-4]))


@functools.lru_cache(maxsize=64)
def _decode_headers_cached(raw: bytes) -> Mapping[str, HeaderValue]:
    """Headers parsed once per distinct byte string: a stream repeats the same few
    (every Bedrock chunk has the same three), which halves the decode cost."""
    return types.MappingProxyType(_decode_headers(memoryview(raw)))


def _decode_headers(raw: memoryview) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    pos = 0
    try:
        while pos < len(raw):
            name_len = raw[pos]
            name = bytes(raw[pos + 1 : pos + 1 + name_len]).decode("utf-8")
            pos += 1 + name_len
            value, pos = _decode_value(raw, pos)
            if name in headers:
                raise EventStreamError(f"event stream header {name!r} appears twice")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EventStreamError("event stream headers are truncated or not UTF-8") from exc
    return headers


def _decode_value(raw: memoryview, pos: int) -> tuple[HeaderValue, int]:
    kind = raw[pos]
    pos += 1
    if kind in (0, 1):
        return kind == 0, pos
    if kind in _INT_FORMATS:
        fmt, bits = _INT_FORMATS[kind]
        return Int(struct.unpack_from(fmt, raw, pos)[0], bits), pos + bits // 8
    if kind == 8:
        return Timestamp(struct.unpack_from(">q", raw, pos)[0]), pos + 8
    if kind == 9:
        if pos + 16 > len(raw):
            raise IndexError(pos)
        return uuid.UUID(bytes=bytes(raw[pos : pos + 16])), pos + 16
    if kind in (6, 7):
        (length,) = struct.unpack_from(">H", raw, pos)
        end = pos + 2 + length
        if end > len(raw):
            raise IndexError(end)
        data = bytes(raw[pos + 2 : end])
        return (data if kind == 6 else data.decode("utf-8")), end
    raise EventStreamError(f"event stream header value type {kind} is unknown")


def encode_message(headers: Mapping[str, HeaderValue], payload: bytes) -> bytes:
    """One message with `headers` (in order) and `payload`, both CRCs computed."""
    encoded_headers = b"".join(_encode_header(name, value) for name, value in headers.items())
    return _frame(encoded_headers, payload)


def _frame(encoded_headers: bytes, payload: bytes) -> bytes:
    total = _MIN_MESSAGE + len(encoded_headers) + len(payload)
    prelude = struct.pack(">II", total, len(encoded_headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded_headers
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, payload, struct.pack(">I", crc)))


def _encode_header(name: str, value: HeaderValue) -> bytes:
    raw_name = name.encode("utf-8")
    if not 0 < len(raw_name) < 256:
        raise ValueError(f"event stream header name {name!r} must be 1-255 bytes")
    return bytes((len(raw_name),)) + raw_name + _encode_value(value)


def _encode_value(value: HeaderValue) -> bytes:
    if isinstance(value, bool):
        return b"\x00" if value else b"\x01"
    if isinstance(value, Int):
        kind, fmt = _INT_TYPES[value.bits]
        return bytes((kind,)) + struct.pack(fmt, value.value)
    if isinstance(value, Timestamp):
        return b"\x08" + struct.pack(">q", value.millis)
    if isinstance(value, uuid.UUID):
        return b"\x09" + value.bytes
    data, kind = (value, 6) if isinstance(value, bytes) else (value.encode("utf-8"), 7)
    if len(data) > 0xFFFF:
        raise ValueError("event stream header value exceeds 65535 bytes")
    return struct.pack(">BH", kind, len(data)) + data


# -- Bedrock's InvokeModelWithResponseStream payloads ---------------------------------

_CHUNK_HEADERS: Mapping[str, HeaderValue] = {
    ":event-type": "chunk",
    ":content-type": "application/json",
    ":message-type": "event",
}

_CHUNK_HEADER_BYTES = b"".join(_encode_header(k, v) for k, v in _CHUNK_HEADERS.items())


def encode_chunk(event_json: bytes) -> bytes:
    """A Bedrock `chunk` message carrying one Anthropic stream event (its JSON bytes)."""
    payload = b'{"bytes":"' + base64.b64encode(event_json) + b'"}'
    return _frame(_CHUNK_HEADER_BYTES, payload)


def encode_exception(exception_type: str, message: str) -> bytes:
    """A Bedrock exception message (`throttlingException`, `internalServerException`, ...)."""
    headers: Mapping[str, HeaderValue] = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_message(headers, orjson.dumps({"message": message}))


def chunk_payload(message: EventMessage) -> bytes:
    """The Anthropic event JSON inside a Bedrock `chunk` message.

    `EventStreamError` when the message is not a well-formed chunk event; exceptions
    are the caller's to handle (check `message.message_type` first).
    """
    if message.message_type != "event" or message.event_type != "chunk":
        raise EventStreamError(
            f"expected a chunk event, got {message.message_type}/{message.event_type}"
        )
    try:
        wrapper = orjson.loads(message.payload)
        return base64.b64decode(wrapper["bytes"], validate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise EventStreamError('a Bedrock chunk payload is not {"bytes": <base64>}') from exc


# -- Bedrock answers as Anthropic stream events (the SSE parser's twin) ---------------

# An Anthropic `error` event's type -> the Bedrock stream exception a client expects
# (the bedrock-runtime ResponseStream exception members).
_EXCEPTION_FOR_ERROR: Mapping[str, str] = {
    "invalid_request_error": "validationException",
    "rate_limit_error": "throttlingException",
    "overloaded_error": "serviceUnavailableException",
    "timeout_error": "modelTimeoutException",
    "api_error": "internalServerException",
}


class BedrockEventParser:
    """Bytes of an InvokeModelWithResponseStream answer -> the Anthropic stream events
    they carry, as `SseEvent`s (named by their `type`, like Anthropic's SSE), so the
    accumulators and the output guard read Bedrock answers as they read SSE. An
    exception message becomes an Anthropic `error` event naming the exception."""

    __slots__ = ("_decoder",)

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._decoder = EventStreamDecoder(max_message_bytes)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        try:
            messages = self._decoder.feed(chunk)
            return [_as_event(m) for m in messages if _carries_an_event(m)]
        except EventStreamError as exc:
            raise _unreadable(exc) from exc

    def close(self) -> list[SseEvent]:
        try:
            self._decoder.close()
        except EventStreamError as exc:
            raise _unreadable(exc) from exc
        return []


def _unreadable(exc: EventStreamError) -> AnswerWithheld:
    """A broken provider stream as the gateway error its client gets (502, withheld)."""
    return AnswerWithheld(f"is not a valid AWS event stream: {exc}", reason="undecodable_answer")


def _carries_an_event(message: EventMessage) -> bool:
    """A chunk or an exception; other event types (none today) are skipped, not fatal."""
    return message.message_type != "event" or message.event_type == "chunk"


def _as_event(message: EventMessage) -> SseEvent:
    if message.message_type in ("exception", "error"):
        kind = message.header(":exception-type") or message.header(":error-code") or "error"
        try:
            text = str(orjson.loads(message.payload).get("message", ""))
        except (orjson.JSONDecodeError, AttributeError):
            text = message.payload.decode("utf-8", "replace")
        error = {"type": "error", "error": {"type": kind, "message": text}}
        return SseEvent("error", orjson.dumps(error).decode())
    data = chunk_payload(message).decode("utf-8", "replace")
    try:
        name = orjson.loads(data).get("type")
    except (orjson.JSONDecodeError, AttributeError):
        name = None
    return SseEvent(name if isinstance(name, str) else None, data)


def encode_bedrock_event(event: str | None, data: str) -> bytes:
    """One Anthropic stream event in Bedrock framing (`encode_event`'s twin): a chunk,
    or for an `error` event the exception message Bedrock would send."""
    if event == "error" or data.startswith('{"type":"error"'):
        try:
            error = orjson.loads(data).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
        kind = str(error.get("type", "api_error"))
        exception = _EXCEPTION_FOR_ERROR.get(kind, "internalServerException")
        return encode_exception(exception, str(error.get("message", "")))
    return encode_chunk(data.encode("utf-8"))


class EventStreamFraming:
    """AWS event-stream as a framing (`extproc.apis.framing.Framing`): a Bedrock answer's
    bytes <-> the Anthropic stream events it carries."""

    content_type = CONTENT_TYPE

    def parser(self) -> BedrockEventParser:
        return BedrockEventParser()

    def encode(self, event: SseEvent) -> bytes:
        return encode_bedrock_event(event.event, event.data)


EVENT_STREAM = EventStreamFraming()
