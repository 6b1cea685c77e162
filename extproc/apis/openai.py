"""The OpenAI Chat Completions shape: error bodies, usage, and folding of SSE streams.

Pure functions and one small state machine, no I/O:

* `error_type_for_status` / `error_body`: the error envelope
  `{"error": {"message", "type", "param", "code"}}`.
* `usage_from_completion`: `Usage` of a `chat.completion` body. OpenAI's
  `prompt_tokens` include cached tokens; they are split out so `Usage` counts
  each token once (`input + cache_read + cache_creation == prompt_tokens`).
* `StreamAccumulator`: fed the `SseEvent`s of a streamed completion
  (`chat.completion.chunk` objects, an optional usage-only chunk with empty
  `choices` when `stream_options.include_usage` is set, then `data: [DONE]`), it
  tracks usage, completion and errors, and folds the chunks into the
  `chat.completion` the non-streaming endpoint would have returned. String fields
  of a delta concatenate, tool calls assemble by `index`, as in the official SDK.
  Bad event data is counted, never raised.
* `unfold_completion`: the reverse, a `chat.completion` as a valid chunk stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson

from extproc.apis.sse import SseEvent, encode_event
from extproc.apis.usage import Usage, as_count

__all__ = [
    "StreamAccumulator",
    "error_body",
    "error_type_for_status",
    "finish_reasons",
    "unfold_completion",
    "usage_from_completion",
    "usage_from_mapping",
]

# OpenAI documents errors by status and sets `type` loosely; SDKs dispatch on status.
_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_DONE: Final = "[DONE]"
# Chunk keys that are not completion metadata.
_NOT_META: Final = frozenset({"choices", "usage", "object", "obfuscation"})
_MALFORMED: Final = (LookupError, TypeError, ValueError, AttributeError)
# Delta keys that carry generated content (for time-to-first-token).
_CONTENT_KEYS: Final = ("content", "tool_calls", "refusal", "reasoning_content", "reasoning")


def error_type_for_status(status: int) -> str:
    """The OpenAI `error.type` for an HTTP status."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_body(
    status: int, message: str, error_type: str | None = None, code: str | None = None
) -> bytes:
    """An OpenAI error response body."""
    error = {
        "message": message,
        "type": error_type or error_type_for_status(status),
        "param": None,
        "code": code,
    }
    return orjson.dumps({"error": error})


def usage_from_mapping(usage: object) -> Usage:
    """`Usage` from an OpenAI `usage` object; anything missing or null counts 0."""
    if not isinstance(usage, Mapping):
        return Usage()
    prompt = as_count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping):
        details = {}
    cache_read = min(as_count(details.get("cached_tokens")), prompt)
    cache_write = min(as_count(details.get("cache_write_tokens")), prompt - cache_read)
    return Usage(
        input_tokens=prompt - cache_read - cache_write,
        output_tokens=as_count(usage.get("completion_tokens")),
        cache_creation_input_tokens=cache_write,
        cache_read_input_tokens=cache_read,
    )


def usage_from_completion(body: Mapping[str, Any]) -> Usage:
    """`Usage` of a non-streaming `chat.completion` body."""
    return usage_from_mapping(body.get("usage"))


def finish_reasons(body: Mapping[str, Any]) -> list[str]:
    """Each choice's `finish_reason`, in choice order."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return []
    return [
        c["finish_reason"]
        for c in choices
        if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str)
    ]


class _Choice:
    """One choice being streamed: its message fields, tool calls and finish reason."""

    __slots__ = ("finish_reason", "logprobs", "parts", "tool_calls", "values")

    def __init__(self) -> None:
        self.parts: dict[str, list[str]] = {}  # string fields, concatenated at fold
        self.values: dict[str, Any] = {}  # other fields: last non-null value wins
        self.tool_calls: dict[int, _ToolCall] = {}
        self.finish_reason: Any = None
        self.logprobs: dict[str, Any] | None = None

    def feed(self, choice: Mapping[str, Any]) -> None:
        for key, value in (choice.get("delta") or {}).items():
            if key == "tool_calls" and value:
                self._feed_tool_calls(value)
            elif key == "role" or not isinstance(value, str):
                if value is not None or key not in self.values:
                    self.values[key] = value
            else:
                self.parts.setdefault(key, []).append(value)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        if choice.get("logprobs") is not None:
            self._feed_logprobs(choice["logprobs"])

    def _feed_tool_calls(self, calls: Any) -> None:
        for call in calls:
            index = int(call["index"])
            if index not in self.tool_calls:
                self.tool_calls[index] = _ToolCall()
            self.tool_calls[index].feed(call)

    def _feed_logprobs(self, logprobs: Mapping[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {key: _copy_list(value) for key, value in logprobs.items()}
            return
        for key, value in logprobs.items():
            if isinstance(value, list) and isinstance(self.logprobs.get(key), list):
                self.logprobs[key].extend(value)
            elif value is not None:
                self.logprobs[key] = _copy_list(value)

    def folded(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", **self.values}
        for key, parts in self.parts.items():
            message[key] = "".join(parts)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].folded() for i in sorted(self.tool_calls)]
        return {
            "index": index,
            "message": message,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }


class _ToolCall:
    """One tool call assembled from deltas: id, type and name once, arguments appended."""

    __slots__ = ("arguments", "fields", "name")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.name: str | None = None
        self.arguments: list[str] = []

    def feed(self, call: Mapping[str, Any]) -> None:
        for key in ("id", "type"):
            if call.get(key) is not None:
                self.fields[key] = call[key]
        function = call.get("function") or {}
        if function.get("name"):
            self.name = str(function["name"])
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            self.arguments.append(arguments)

    def folded(self) -> dict[str, Any]:
        return {
            "id": self.fields.get("id"),
            "type": self.fields.get("type", "function"),
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class StreamAccumulator:
    """Feed it the SseEvents of a streamed /v1/chat/completions response."""

    __slots__ = (
        "_choices",
        "_meta",
        "_usage",
        "complete",
        "content_bytes",
        "error",
        "final_usage_seen",
        "first_content_seen",
        "malformed_events",
        "model",
        "usage",
    )

    def __init__(self) -> None:
        self.usage = Usage()
        self.model: str | None = None
        self.complete = False
        self.error: dict[str, Any] | None = None
        self.first_content_seen = False
        self.malformed_events = 0
        # Bytes of generated content seen (content, refusal, reasoning, tool arguments):
        # what an aborted stream is billed from when the usage chunk never arrives.
        self.content_bytes = 0
        self.final_usage_seen = False
        self._meta: dict[str, Any] = {}
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}

    def feed(self, event: SseEvent) -> None:
        """Take one event; `[DONE]` completes the stream, malformed chunks are counted."""
        if event.data.startswith(_DONE):
            self.complete = True
            return
        try:
            chunk = orjson.loads(event.data)
            if chunk.get("error") is not None:
                error = chunk["error"]
                self.error = dict(error) if isinstance(error, Mapping) else {"message": error}
            else:
                self._feed_chunk(chunk)
        except _MALFORMED:  # orjson.JSONDecodeError is a ValueError
            self.malformed_events += 1

    def folded_message(self) -> dict[str, Any]:
        """The non-streaming `chat.completion` this stream is equivalent to."""
        if not self.complete:
            raise ValueError("the stream has not completed (no [DONE] seen)")
        choices = [self._choices[i].folded(i) for i in sorted(self._choices)]
        return {**self._meta, "object": "chat.completion", "choices": choices, "usage": self._usage}

    def finish_reasons(self) -> list[str]:
        reasons = (self._choices[i].finish_reason for i in sorted(self._choices))
        return [r for r in reasons if isinstance(r, str)]

    def _feed_chunk(self, chunk: Mapping[str, Any]) -> None:
        for key, value in chunk.items():
            if key not in _NOT_META and (value is not None or key not in self._meta):
                self._meta[key] = value
        if self.model is None and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        for choice in chunk.get("choices") or ():
            self._feed_choice(choice)
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self._usage = dict(usage)
            self.usage = usage_from_mapping(usage)
            self.final_usage_seen = True

    def _feed_choice(self, choice: Mapping[str, Any]) -> None:
        index = int(choice.get("index") or 0)
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _Choice()
        state.feed(choice)
        self.content_bytes += _content_bytes(choice.get("delta") or {})
        if not self.first_content_seen:
            delta = choice.get("delta") or {}
            self.first_content_seen = any(delta.get(key) for key in _CONTENT_KEYS)


def _content_bytes(delta: Mapping[str, Any]) -> int:
    """UTF-8 bytes of the generated text in one delta (tool arguments included)."""
    size = sum(len(v.encode()) for k in _CONTENT_KEYS if isinstance(v := delta.get(k), str))
    for call in delta.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            size += len(arguments.encode())
    return size


def _copy_list(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def unfold_completion(body: Mapping[str, Any]) -> bytes:
    """A `chat.completion` as the chunk stream the streaming endpoint would have sent.

    One chunk opens each choice (role and null fields), one carries each string
    field, one each tool call, one the finish reason; then a usage-only chunk
    (as with `stream_options.include_usage`) and `data: [DONE]`.
    """
    base = {key: value for key, value in body.items() if key not in _NOT_META}
    base["object"] = "chat.completion.chunk"
    out = [_sse({**base, "choices": [c]}) for c in _unfolded_choices(body)]
    if body.get("usage") is not None:
        out.append(_sse({**base, "choices": [], "usage": body["usage"]}))
    out.append(encode_event(None, _DONE))
    return b"".join(out)


def _unfolded_choices(body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        opening = {k: v for k, v in message.items() if k == "role" or v is None}
        yield _chunk_choice(index, opening)
        for key, value in message.items():
            if key == "tool_calls" and value:
                for i, call in enumerate(value):
                    yield _chunk_choice(index, {"tool_calls": [{"index": i, **call}]})
            elif key != "role" and value is not None:
                yield _chunk_choice(index, {key: value})
        closing = {"logprobs": choice.get("logprobs"), "finish_reason": choice.get("finish_reason")}
        yield {**_chunk_choice(index, {}), **closing}


def _chunk_choice(index: int, delta: Mapping[str, Any]) -> dict[str, Any]:
    return {"index": index, "delta": dict(delta), "logprobs": None, "finish_reason": None}


def _sse(chunk: Mapping[str, Any]) -> bytes:
    return encode_event(None, orjson.dumps(chunk).decode())


_EVENT_END = re.compile(rb"(?:\r\n|\r|\n)(?:\r\n|\r|\n)")


def asks_for_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streamed request set `stream_options.include_usage: true` itself."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def request_usage(body: dict[str, Any]) -> bool:
    """Set `stream_options.include_usage: true` (the provider sends no usage otherwise);
    True if the body changed."""
    if asks_for_usage(body):
        return False
    options = body.get("stream_options")
    kept = options if isinstance(options, dict) else {}
    body["stream_options"] = {**kept, "include_usage": True}
    return True


class UsageChunkDropper:
    """Removes the usage-only chunk (empty `choices`, a `usage`) from a chunk stream, for a
    client that did not ask for it. Events pass byte for byte; one that is not yet complete
    is held until its blank line arrives (its bytes are of no use to a client before)."""

    __slots__ = ("_pending", "dropped")

    def __init__(self) -> None:
        self._pending = b""
        self.dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        # A CR at the very end may be the first half of a CRLF: wait for the next byte.
        ends = [m.end() for m in _EVENT_END.finditer(data.removesuffix(b"\r"))]
        if not ends:
            self._pending = data
            return b""
        self._pending = data[ends[-1] :]
        out, start = [], 0
        for end in ends:
            event = data[start:end]
            start = end
            if _usage_only(event):
                self.dropped += 1
            else:
                out.append(event)
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        if _usage_only(rest):
            self.dropped += 1
            return b""
        return rest


def _usage_only(event: bytes) -> bool:
    if b'"usage"' not in event:
        return False
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and chunk.get("usage") is not None


# -- the answer's texts (output screening and unmasking walk an answer through these) ----

Path = tuple[str | int, ...]
_ANSWER_FIELDS: Final = ("content", "refusal", "reasoning_content", "reasoning")
# Per-run fields that never change an answer: dropped from cache keys.
_CACHE_NOISE: Final = ("stream", "stream_options", "user", "store", "metadata")


def answer_texts(body: Mapping[str, Any]) -> Iterator[tuple[Path, str, bool]]:
    """(path, text, is-JSON-text) for every answer text a client renders or executes:
    content, refusal, reasoning and tool-call arguments (JSON in a string)."""
    for i, choice in enumerate(body.get("choices") or ()):
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            yield from _message_texts(msg, ("choices", i, "message"))


def _message_texts(msg: Mapping[str, Any], at: Path) -> Iterator[tuple[Path, str, bool]]:
    for name in _ANSWER_FIELDS:
        if isinstance(msg.get(name), str):
            yield (*at, name), msg[name], False
    calls: list[tuple[Path, Any]] = [
        (("tool_calls", j, "function"), c.get("function") if isinstance(c, dict) else None)
        for j, c in enumerate(msg.get("tool_calls") or ())
    ]
    calls.append((("function_call",), msg.get("function_call")))
    for where, fn in calls:
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            yield (*at, *where, "arguments"), fn["arguments"], True


def screened_parts(body: Mapping[str, Any]) -> Iterator[tuple[Path, Any, str]]:
    """(path, value, kind) of each answer part output screening reads: `text`, or a
    `json_text` (tool-call arguments)."""
    for path, text, is_json in answer_texts(body):
        yield path, text, "json_text" if is_json else "text"


def answer_text(answer: Mapping[str, Any]) -> str:
    """The first choice's content (what a structured-output schema checks)."""
    choices = answer.get("choices") or ()
    message = choices[0].get("message", {}) if choices and isinstance(choices[0], dict) else {}
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def cache_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without per-run noise (`stream`, `stream_options`, `user`, `store`,
    `metadata`), for cache keys."""
    clean = dict(body)
    for name in _CACHE_NOISE:
        clean.pop(name, None)
    return clean


def stream_error_event(error_body: bytes) -> SseEvent:
    """An error body as the last chunk of a stream (OpenAI has no error event name)."""
    return SseEvent(None, error_body.decode())
