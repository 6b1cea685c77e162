"""Wire encodings of a streamed answer: bytes in, events out, and back.

A `Framing` owns one encoding (`text/event-stream` today; AWS event-stream
`application/vnd.amazon.eventstream` next): it makes a fresh incremental parser
per answer and encodes one event. Events are `SseEvent` values (a name, a JSON
data string, an id) whatever the encoding: a dialect reads and writes the data,
never the bytes around it, so the same Anthropic events can travel as SSE to one
client and as event-stream frames to another.

Register a framing with `register_framing`; `framing_for(content_type)` picks one
by the answer's `content-type` (None: not a stream the gateway reads).
"""

from __future__ import annotations

from typing import Protocol

from extproc.apis.sse import SseEvent, SseParser, encode_event

__all__ = ["SSE", "EventParser", "Framing", "SseFraming", "framing_for", "register_framing"]


class EventParser(Protocol):
    """Incremental: bytes of any split in, the events they completed out."""

    def feed(self, chunk: bytes) -> list[SseEvent]: ...

    def close(self) -> list[SseEvent]: ...


class Framing(Protocol):
    content_type: str  # the media type, without parameters

    def parser(self) -> EventParser: ...

    def encode(self, event: SseEvent) -> bytes: ...


class SseFraming:
    """Server-Sent Events (`extproc.apis.sse`)."""

    content_type = "text/event-stream"

    def parser(self) -> EventParser:
        return SseParser()

    def encode(self, event: SseEvent) -> bytes:
        return encode_event(event.event, event.data)


SSE = SseFraming()

_FRAMINGS: dict[str, Framing] = {SSE.content_type: SSE}


def register_framing(framing: Framing) -> None:
    _FRAMINGS[framing.content_type] = framing


def framing_for(content_type: str) -> Framing | None:
    """The framing of an answer by its `content-type` header (parameters ignored)."""
    return _FRAMINGS.get(content_type.partition(";")[0].strip().lower())
