"""Incremental Server-Sent Events parser and encoder, with no I/O (in the style of h11).

Feed `SseParser.feed` the bytes of a `text/event-stream` body as they arrive, in
chunks of any size; it returns the events those bytes completed. Chunk boundaries
mean nothing: a line ending, a field or a multibyte UTF-8 character may be split
across chunks. Parsing follows the WHATWG HTML "event stream interpretation" rules:

* a line ends in CRLF, LF or CR; a CR at the end of one chunk followed by an LF at
  the start of the next is one line ending;
* a leading UTF-8 BOM is dropped; bytes are decoded as UTF-8 with replacement;
* `:` starts a comment; `field: value` loses exactly one space after the colon;
  a line without a colon is a field with an empty value;
* `data` lines accumulate, joined with LF; a blank line dispatches the event when
  at least one `data` line was seen; `id` persists across events (last event ID).

Two deliberate choices differ from a browser's `EventSource`: the event name is
None when absent (no `message` default), and `close()` dispatches a final event
that lacks its terminating blank line, since proxies and lenient servers
sometimes drop it and the gateway must still account for it.

Memory is bounded: a pending line, or the data of one pending event, longer than
`max_bytes` raises `SseError`. Splitting works on bytes (CR and LF never occur
inside a multibyte UTF-8 sequence), so each complete line is decoded once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_BYTES", "SseError", "SseEvent", "SseParser", "encode_event"]

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class SseError(ValueError):
    """The event stream broke a limit (a line or an event too large to buffer)."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its `event:` name (None when absent), data and last id."""

    event: str | None
    data: str
    id: str | None = None


class SseParser:
    """Turns chunks of an event-stream body into `SseEvent`s; see the module docstring."""

    __slots__ = (
        "_bom_pending",
        "_data",
        "_data_size",
        "_event",
        "_last_id",
        "_max_bytes",
        "_pending",
        "_pending_size",
        "_skip_lf",
        "retry",
    )

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._pending: list[bytes] = []  # pieces of a line whose ending has not arrived
        self._pending_size = 0
        self._skip_lf = False  # the last byte seen was a CR that ended a line
        self._bom_pending = True  # still at stream start, a BOM may be (partly) here
        self._event: str | None = None
        self._data: list[str] = []
        self._data_size = 0
        self._last_id: str | None = None
        self.retry: int | None = None  # last valid `retry:` value, in milliseconds

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Consume `chunk`; return the events it completed, in order."""
        chunk = self._strip_bom(chunk)
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._hold(chunk)  # a line grown piecewise costs O(n), not O(n^2)
            return []
        self._pending.append(chunk)
        lines = b"".join(self._pending).splitlines(keepends=True)
        self._pending, self._pending_size = [], 0
        if lines[-1][-1:] in (b"\r", b"\n"):
            self._skip_lf = lines[-1][-1:] == b"\r"
        else:
            self._hold(lines.pop())
        return self._process(lines)

    def close(self) -> list[SseEvent]:
        """End of stream: dispatch an event left without its terminating blank line."""
        lines = [b"".join(self._pending)] if self._pending else []
        self._pending, self._pending_size = [], 0
        self._skip_lf = False
        events = self._process(lines)
        dispatched = self._dispatch()
        if dispatched is not None:
            events.append(dispatched)
        return events

    def _hold(self, piece: bytes) -> None:
        """Keep the start of a line whose ending has not arrived, within the limit."""
        self._pending.append(piece)
        self._pending_size += len(piece)
        self._check_size(self._pending_size, "line")

    def _strip_bom(self, chunk: bytes) -> bytes:
        """Drop a UTF-8 BOM at stream start, even when it arrives a byte at a time."""
        if not self._bom_pending:
            return chunk
        head = b"".join(self._pending) + chunk
        self._pending, self._pending_size = [], 0
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._pending, self._pending_size = [head], len(head)  # too short to decide
            return b""
        self._bom_pending = False
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _check_size(self, size: int, what: str) -> None:
        if size > self._max_bytes:
            raise SseError(f"SSE {what} exceeds {self._max_bytes} bytes")

    def _process(self, lines: list[bytes]) -> list[SseEvent]:
        events: list[SseEvent] = []
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if not line:
                dispatched = self._dispatch()
                if dispatched is not None:
                    events.append(dispatched)
            elif line[0] != 0x3A:  # ':' starts a comment
                self._field(line)
        return events

    def _field(self, line: bytes) -> None:
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data_size += len(value) + 1
            self._check_size(self._data_size, "event")
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self.retry = int(value)

    def _dispatch(self) -> SseEvent | None:
        data, event = self._data, self._event
        self._data, self._event, self._data_size = [], None, 0
        if not data:
            return None
        return SseEvent(event or None, "\n".join(data), self._last_id)


def encode_event(event: str | None, data: str) -> bytes:
    """Serialise one event: `event: x` (when given), one `data:` line per line of data.

    Any line ending in `data` (CRLF, CR, LF) becomes a separate `data:` line, so
    the parser gives back `data` with its line endings normalised to LF.
    """
    parts: list[str] = []
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError("SSE event name must not contain CR or LF")
        parts.append(f"event: {event}\n")
    parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    parts.append("\n")
    return "".join(parts).encode("utf-8")
