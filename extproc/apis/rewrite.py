"""Rewrite the text of a streamed answer on its way to the client, event by event.

Output screening and unmasking change answer text, and a streamed answer
arrives as SSE events cut at arbitrary byte boundaries. `SseTextRewriter` is
fed raw body chunks and returns the bytes to send on now: every event is
re-emitted as it came, except text deltas, whose text goes through a
`TextTransform` per content block (Anthropic `content_block_delta` /
`text_delta`, OpenAI `choices[i].delta.content`). A transform may hold text
back (a secret may be split across deltas); what it holds is released before
the block ends (`content_block_stop`, or the OpenAI chunk with
`finish_reason`). A delta whose text is entirely held back is dropped, so the
client sees fewer, later deltas, never different framing.

A transform that decides the answer must stop raises `StopAnswer`: an `error`
event in the provider's shape is sent and the rest of the stream is dropped.
No I/O here; the caller also gets the events it sent, for accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import orjson

from extproc.apis.sse import SseEvent, SseParser, encode_event

Api = Literal["anthropic", "openai"]


class TextTransform(Protocol):
    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


class StopAnswer(Exception):
    """Raised by a transform: the answer must not continue (e.g. a blocked pattern)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule


class SseTextRewriter:
    def __init__(self, api: Api, make: Callable[[], TextTransform]) -> None:
        self.api = api
        self._make = make
        self._parser = SseParser()
        self._blocks: dict[int, TextTransform] = {}
        self.stopped: StopAnswer | None = None
        self.sent: list[SseEvent] = []

    def feed(self, chunk: bytes) -> bytes:
        return self._emit(self._parser.feed(chunk))

    def close(self) -> bytes:
        out = self._emit(self._parser.close())
        if self.stopped is None:
            out += b"".join(self._flush(index) for index in sorted(self._blocks))
        return out

    def _emit(self, events: list[SseEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self.stopped is not None:
                break
            try:
                out.extend(self._rewrite(event))
            except StopAnswer as stop:
                self.stopped = stop
                out.append(self._send(self._error_event(stop)))
        return b"".join(out)

    def _send(self, event: SseEvent) -> bytes:
        self.sent.append(event)
        return encode_event(event.event, event.data)

    def _rewrite(self, event: SseEvent) -> list[bytes]:
        payload = _json(event.data)
        if payload is None:
            return [self._send(event)]
        if self.api == "anthropic":
            return self._anthropic(event, payload)
        return self._openai(event, payload)

    # -- Anthropic ------------------------------------------------------------------------

    def _anthropic(self, event: SseEvent, payload: dict[str, Any]) -> list[bytes]:
        kind = payload.get("type")
        index = payload.get("index")
        if kind == "content_block_delta" and isinstance(index, int):
            delta = payload.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = self._block(index).feed(str(delta.get("text", "")))
                return [self._send(_text_delta(index, text))] if text else []
        if kind == "content_block_stop" and isinstance(index, int):
            return [self._flush(index), self._send(event)]
        return [self._send(event)]

    def _block(self, index: int) -> TextTransform:
        transform = self._blocks.get(index)
        if transform is None:
            transform = self._blocks[index] = self._make()
        return transform

    def _flush(self, index: int) -> bytes:
        transform = self._blocks.pop(index, None)
        text = transform.flush() if transform is not None else ""
        if not text:
            return b""
        if self.api == "anthropic":
            return self._send(_text_delta(index, text))
        return self._send(_openai_delta(index, text))

    # -- OpenAI ---------------------------------------------------------------------------

    def _openai(self, event: SseEvent, payload: dict[str, Any]) -> list[bytes]:
        choices = payload.get("choices")
        if not isinstance(choices, list):
            return [self._send(event)]
        for choice in choices:
            if isinstance(choice, dict) and isinstance(choice.get("index"), int):
                self._openai_choice(choice)
        return [self._send(SseEvent(event.event, orjson.dumps(payload).decode(), event.id))]

    def _openai_choice(self, choice: dict[str, Any]) -> None:
        """Transform a choice's content in place; its last chunk also carries what was held."""
        index: int = choice["index"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        content = delta.get("content")
        text = self._block(index).feed(content) if isinstance(content, str) else ""
        if choice.get("finish_reason") is not None:
            transform = self._blocks.pop(index, None)
            text += transform.flush() if transform is not None else ""
        if isinstance(content, str) or text:
            delta["content"] = text

    def _error_event(self, stop: StopAnswer) -> SseEvent:
        if self.api == "anthropic":
            error = {"type": "error", "error": {"type": "api_error", "message": stop.message}}
            return SseEvent("error", orjson.dumps(error).decode())
        body = {"error": {"message": stop.message, "type": "content_filter", "code": stop.rule}}
        return SseEvent(None, orjson.dumps(body).decode())


def _json(data: str) -> dict[str, Any] | None:
    if not data.startswith("{"):
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _text_delta(index: int, text: str) -> SseEvent:
    payload = {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }
    return SseEvent("content_block_delta", orjson.dumps(payload).decode())


def _openai_delta(index: int, text: str) -> SseEvent:
    payload = {
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}],
    }
    return SseEvent(None, orjson.dumps(payload).decode())
