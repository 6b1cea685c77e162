"""Rewrite the text of a streamed answer on its way to the client, event by event.

Output screening and unmasking change answer text, and a streamed answer
arrives as SSE events cut at arbitrary byte boundaries. `SseTextRewriter` is
fed raw body chunks and returns the bytes to send on now: every event is
re-emitted as it came, except the deltas a client renders or executes, whose
text goes through a `TextTransform` per content block:

- Anthropic `content_block_delta`: `text_delta` (text), `thinking_delta`
  (thinking) and `input_json_delta` (a tool call's input, as partial JSON);
- OpenAI `choices[i].delta`: `content`, `refusal`, `reasoning_content` and each
  `tool_calls[k].function.arguments` (partial JSON).

Partial JSON goes through `JsonStrings`: only the contents of JSON strings are
transformed (decoded first, so `\n` is a line break to the screener, and
re-encoded after), so a redacted tool input is still valid JSON when the
client joins the deltas. A transform may hold text back (a secret may be split
across deltas); what it holds is released before the block ends
(`content_block_stop`, or the OpenAI chunk with `finish_reason`). A delta whose
text is entirely held back is dropped, so the client sees fewer, later deltas,
never different framing.

A transform that decides the answer must stop raises `StopAnswer`: an `error`
event in the provider's shape is sent and the rest of the stream is dropped.
No I/O here; the caller also gets the events it sent, for accounting.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from extproc.apis.framing import SSE, Framing
from extproc.apis.kind import ApiKind
from extproc.apis.sse import SseEvent
from extproc.apis.walk import value_texts

Api = ApiKind


class TextTransform(Protocol):
    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


class StopAnswer(Exception):
    """Raised by a transform: the answer must not continue (e.g. a blocked pattern)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule


_SPECIAL = re.compile(r'["\\]')
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"'}
_encode = json.encoder.encode_basestring


def _json_text(text: str) -> str:
    """`text` as the inside of a JSON string (lone surrogates as \\u escapes)."""
    if not text:
        return ""
    out: str = _encode(text)[1:-1]
    if _SURROGATE.search(out):
        out = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)
    return out


class JsonStrings:
    """A `TextTransform` for partial JSON: a fresh transform from `make` sees the decoded
    contents of each string (flushed at its closing quote: a match cannot span two
    strings, nor see the end of the last one as its left neighbour); numbers, quotes
    and punctuation pass through unchanged."""

    def __init__(self, make: Callable[[], TextTransform]) -> None:
        self.make = make
        self.inner: TextTransform | None = None  # set while inside a string
        self.pending = ""  # an escape sequence cut by a delta boundary

    def feed(self, text: str) -> str:
        buf, self.pending = self.pending + text, ""
        out: list[str] = []
        i = 0
        while i < len(buf):
            if self.inner is None:
                i = self._outside(buf, i, out)
            else:
                i = self._string(self.inner, buf, i, out)
        return "".join(out)

    def _outside(self, buf: str, i: int, out: list[str]) -> int:
        j = buf.find('"', i)
        if j < 0:
            out.append(buf[i:])
            return len(buf)
        out.append(buf[i : j + 1])
        self.inner = self.make()
        return j + 1

    def _string(self, inner: TextTransform, buf: str, i: int, out: list[str]) -> int:
        m = _SPECIAL.search(buf, i)
        j = m.start() if m is not None else len(buf)
        if j > i:
            out.append(_json_text(inner.feed(buf[i:j])))
        if m is None:
            return j
        if buf[j] == '"':
            out.append(_json_text(inner.flush()) + '"')
            self.inner = None
            return j + 1
        decoded, end = _unescape(buf, j)
        if decoded is None:
            self.pending = buf[j:]
            return len(buf)
        out.append(_json_text(inner.feed(decoded)))
        return end

    def flush(self) -> str:
        held = _json_text(self.inner.flush()) if self.inner is not None else ""
        out, self.pending = held + self.pending, ""
        return out


def _unescape(buf: str, j: int) -> tuple[str | None, int]:
    """The character the escape at `buf[j]` stands for, and where it ends; None when
    the escape is cut off (wait for the next delta)."""
    if j + 1 >= len(buf):
        return None, j
    kind = buf[j + 1]
    if kind != "u":
        return _ESCAPES.get(kind, kind), j + 2
    digits = buf[j + 2 : j + 6]
    if len(digits) < 4:
        return None, j
    try:
        return chr(int(digits, 16)), j + 6
    except ValueError:
        return digits, j + 6  # invalid escape: pass the text on for the provider's parser


# Anthropic delta types a client renders or executes: (field, is partial JSON)
_ANTHROPIC_DELTAS = {
    "text_delta": ("text", False),
    "thinking_delta": ("thinking", False),
    "input_json_delta": ("partial_json", True),
}
_OPENAI_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")


class SseTextRewriter:
    def __init__(self, api: Api, make: Callable[[], TextTransform], framing: Framing = SSE) -> None:
        self.api = api
        self._make = make
        self._framing = framing
        self._parser = framing.parser()
        self._handle = _HANDLERS[api]
        self._blocks: dict[int, TextTransform] = {}
        self._kinds: dict[int, str] = {}  # Anthropic block index -> its delta type
        self._fields: dict[tuple[int, str], TextTransform] = {}  # OpenAI (choice, field)
        self.stopped: StopAnswer | None = None
        self.sent: list[SseEvent] = []

    def feed(self, chunk: bytes) -> bytes:
        return self._emit(self._parser.feed(chunk))

    def close(self) -> bytes:
        out = self._emit(self._parser.close())
        if self.stopped is None:
            out += self._flush_all()
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
        return self._framing.encode(event)

    def _rewrite(self, event: SseEvent) -> list[bytes]:
        payload = _json(event.data)
        if payload is None:
            return [self._send(event)]
        return self._handle(self, event, payload)

    # -- Anthropic ------------------------------------------------------------------------

    def _anthropic(self, event: SseEvent, payload: dict[str, Any]) -> list[bytes]:
        kind = payload.get("type")
        index = payload.get("index")
        delta = payload.get("delta")
        if kind == "content_block_delta" and isinstance(index, int) and isinstance(delta, dict):
            return self._anthropic_delta(event, index, delta)
        if kind == "content_block_stop" and isinstance(index, int):
            return [self._flush(index), self._send(event)]
        if kind == "content_block_start" and self._screen_whole(payload, "content_block"):
            return [self._send(SseEvent(event.event, orjson.dumps(payload).decode(), event.id))]
        return [self._send(event)]

    def _anthropic_delta(self, event: SseEvent, index: int, delta: dict[str, Any]) -> list[bytes]:
        kind = delta.get("type")
        if isinstance(kind, str) and kind in _ANTHROPIC_DELTAS:
            field, _ = _ANTHROPIC_DELTAS[kind]
            text = self._block(index, kind).feed(str(delta.get(field, "")))
            return [self._send(_anthropic_delta(index, kind, text))] if text else []
        if kind == "signature_delta":  # the held thinking goes out before its signature
            return [self._flush(index), self._send(event)]
        return [self._send(event)]

    def _screen_whole(self, payload: dict[str, Any], name: str) -> bool:
        """Screen every text of a part that arrives whole (a server tool's result block,
        say) in place; True if one changed."""
        changed = False
        for path, text in value_texts(payload.get(name)):
            transform = self._make()
            new = transform.feed(text) + transform.flush()
            if new != text:
                _set(payload, (name, *path), new)
                changed = True
        return changed

    def _block(self, index: int, kind: str) -> TextTransform:
        transform = self._blocks.get(index)
        if transform is None:
            transform = self._blocks[index] = self._new(_ANTHROPIC_DELTAS[kind][1])
            self._kinds[index] = kind
        return transform

    def _new(self, partial_json: bool) -> TextTransform:
        return JsonStrings(self._make) if partial_json else self._make()

    def _flush(self, index: int) -> bytes:
        transform = self._blocks.pop(index, None)
        text = transform.flush() if transform is not None else ""
        if not text:
            return b""
        return self._send(_anthropic_delta(index, self._kinds[index], text))

    def _flush_all(self) -> bytes:
        """End of stream without the blocks' ends: release what is held."""
        out = b"".join(self._flush(index) for index in sorted(self._blocks))
        held = [(key, t.flush()) for key, t in sorted(self._fields.items())]
        self._fields.clear()
        for (choice, field), text in held:
            if text:
                out += self._send(_openai_delta(choice, field, text))
        return out

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
        """Transform a choice's texts in place; its last chunk also carries what was held."""
        index: int = choice["index"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        done = choice.get("finish_reason") is not None
        for name in _OPENAI_FIELDS:
            value = delta.get(name)
            text = self._field(index, name, False).feed(value) if isinstance(value, str) else ""
            text += self._release(index, name) if done else ""
            if isinstance(value, str) or text:
                delta[name] = text
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                name = f"tool_calls.{call.get('index', 0)}"
                fn["arguments"] = self._field(index, name, True).feed(fn["arguments"])
        if done:
            self._release_calls(index, delta)

    def _field(self, choice: int, name: str, partial_json: bool) -> TextTransform:
        transform = self._fields.get((choice, name))
        if transform is None:
            transform = self._fields[(choice, name)] = self._new(partial_json)
        return transform

    def _release(self, choice: int, name: str) -> str:
        transform = self._fields.pop((choice, name), None)
        return transform.flush() if transform is not None else ""

    def _release_calls(self, choice: int, delta: dict[str, Any]) -> None:
        """Held tool-call arguments go out with the choice's last chunk."""
        held = [name for c, name in self._fields if c == choice and name.startswith("tool_calls.")]
        extra = []
        for name in sorted(held):
            text = self._release(choice, name)
            if text:
                call = int(name.split(".", 1)[1]) if name.split(".", 1)[1].isdigit() else 0
                extra.append({"index": call, "function": {"arguments": text}})
        if extra:
            delta["tool_calls"] = [*(delta.get("tool_calls") or []), *extra]

    def _error_event(self, stop: StopAnswer) -> SseEvent:
        return _STOP_EVENTS[self.api](stop)


def _anthropic_stop(stop: StopAnswer) -> SseEvent:
    error = {"type": "error", "error": {"type": "api_error", "message": stop.message}}
    return SseEvent("error", orjson.dumps(error).decode())


def _openai_stop(stop: StopAnswer) -> SseEvent:
    body = {"error": {"message": stop.message, "type": "content_filter", "code": stop.rule}}
    return SseEvent(None, orjson.dumps(body).decode())


# Per wire schema: how its events are rewritten, and the event that stops an answer.
_HANDLERS: dict[ApiKind, Callable[[SseTextRewriter, SseEvent, dict[str, Any]], list[bytes]]] = {
    "anthropic": SseTextRewriter._anthropic,
    "openai": SseTextRewriter._openai,
    "bedrock": SseTextRewriter._anthropic,
    "vertex": SseTextRewriter._anthropic,
}
_STOP_EVENTS: dict[ApiKind, Callable[[StopAnswer], SseEvent]] = {
    "anthropic": _anthropic_stop,
    "openai": _openai_stop,
    "bedrock": _anthropic_stop,
    "vertex": _anthropic_stop,
}


def _set(root: Any, path: tuple[str | int, ...], value: str) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def _json(data: str) -> dict[str, Any] | None:
    if not data.startswith("{"):
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _anthropic_delta(index: int, kind: str, text: str) -> SseEvent:
    field, _ = _ANTHROPIC_DELTAS[kind]
    payload = {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": kind, field: text},
    }
    return SseEvent("content_block_delta", orjson.dumps(payload).decode())


def _openai_delta(index: int, field: str, text: str) -> SseEvent:
    if field.startswith("tool_calls."):
        call = int(field.split(".", 1)[1]) if field.split(".", 1)[1].isdigit() else 0
        delta: dict[str, Any] = {"tool_calls": [{"index": call, "function": {"arguments": text}}]}
    else:
        delta = {field: text}
    payload = {
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "finish_reason": None}],
    }
    return SseEvent(None, orjson.dumps(payload).decode())
