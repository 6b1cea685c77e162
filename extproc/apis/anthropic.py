"""The Anthropic Messages API shape: error bodies, usage, and folding of SSE streams.

Pure functions and one small state machine, no I/O:

* `error_type_for_status` / `error_body`: the documented error envelope
  `{"type": "error", "error": {"type": ..., "message": ...}}`.
* `usage_from_message`: `Usage` of a non-streaming `/v1/messages` response.
* `StreamAccumulator`: fed the `SseEvent`s of a streamed response (message_start,
  content_block_start/delta/stop, message_delta, message_stop, ping, error), it
  tracks usage, completion and errors, and folds the stream into the Message the
  non-streaming endpoint would have returned (the same rules the official SDK's
  `accumulate_event` applies). Bad event data is counted, never raised.
* `unfold_message`: the reverse, a Message as a valid SSE stream (to answer a
  streaming request from a cached non-streaming Message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import orjson

from extproc.apis.sse import SseEvent, encode_event
from extproc.apis.usage import Usage, as_count
from extproc.apis.walk import json_strings, value_texts

__all__ = [
    "StreamAccumulator",
    "error_body",
    "error_type_for_status",
    "finish_reasons",
    "unfold_message",
    "usage_from_mapping",
    "usage_from_message",
]

# docs.anthropic.com/en/api/errors; other 4xx are invalid_request_error, other 5xx api_error.
_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Where each kind of content block accumulates its streamed fragments.
_BLOCK_FIELD: Final[Mapping[str, str]] = {
    "text": "text",
    "thinking": "thinking",
    "tool_use": "input",
    "server_tool_use": "input",
    "mcp_tool_use": "input",
}
# delta type -> (block field it extends, key of the fragment in the delta)
_DELTA_FIELD: Final[Mapping[str, tuple[str, str]]] = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("input", "partial_json"),
}
# message_delta.usage keys the unfolded stream restates (cumulative, they overwrite).
_DELTA_USAGE_KEYS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "server_tool_use",
    "output_tokens_details",
    "cache_creation",
)
# Handled by StreamAccumulator.feed; a parse error in them is a malformed event.
_MALFORMED: Final = (LookupError, TypeError, ValueError, AttributeError)


def error_type_for_status(status: int) -> str:
    """The Anthropic `error.type` for an HTTP status."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    """An Anthropic error response body."""
    error = {"type": error_type or error_type_for_status(status), "message": message}
    return orjson.dumps({"type": "error", "error": error})


def usage_from_mapping(usage: object) -> Usage:
    """`Usage` from an Anthropic `usage` object; anything missing or null counts 0."""
    if not isinstance(usage, Mapping):
        return Usage()
    created = as_count(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    one_hour = as_count(split.get("ephemeral_1h_input_tokens")) if isinstance(split, Mapping) else 0
    tools = usage.get("server_tool_use")
    searches = as_count(tools.get("web_search_requests")) if isinstance(tools, Mapping) else 0
    return Usage(
        input_tokens=as_count(usage.get("input_tokens")),
        output_tokens=as_count(usage.get("output_tokens")),
        cache_creation_input_tokens=created,
        cache_read_input_tokens=as_count(usage.get("cache_read_input_tokens")),
        cache_creation_1h_input_tokens=min(one_hour, created),
        web_search_requests=searches,
    )


BILLING_PREFIX: Final = "x-anthropic-billing-header:"


def split_billing_block(body: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Claude Code's `system[0]` attribution block (`x-anthropic-billing-header:
    cc_version=...`), which the provider strips by position, held out of `body`:
    (the body without it, the block) or (the body, None). No policy may change it."""
    system = body.get("system")
    if not isinstance(system, list) or not system:
        return dict(body), None
    first = system[0]
    text = first.get("text") if isinstance(first, Mapping) else None
    if not isinstance(text, str) or not text.startswith(BILLING_PREFIX):
        return dict(body), None
    return {**body, "system": system[1:]}, first


def usage_from_message(message: Mapping[str, Any]) -> Usage:
    """`Usage` of a non-streaming `/v1/messages` response body."""
    return usage_from_mapping(message.get("usage"))


def finish_reasons(message: Mapping[str, Any]) -> list[str]:
    """Why the model stopped (`stop_reason`), as a list like OpenAI's per-choice reasons."""
    reason = message.get("stop_reason")
    return [reason] if isinstance(reason, str) else []


class _Block:
    """One content block being streamed: its start object plus text fragments."""

    __slots__ = ("data", "field", "parts")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.field = _BLOCK_FIELD.get(str(data.get("type")))
        start = data.get(self.field) if self.field in ("text", "thinking") else None
        self.parts: list[str] = [start] if isinstance(start, str) and start else []

    def finish(self) -> bool:
        """Write the fragments into `data`, once; False when tool input JSON is malformed.

        Later deltas for a finished block are ignored, as its `field` is cleared.
        """
        field, joined = self.field, "".join(self.parts)
        self.field, self.parts = None, []
        if field is None:
            return True
        if field != "input":
            self.data[field] = joined
            return True
        if not joined.strip():
            return True  # no arguments streamed: keep the start's input (`{}`)
        try:
            self.data["input"] = orjson.loads(joined)
        except orjson.JSONDecodeError:
            return False
        return True


class StreamAccumulator:
    """Feed it the SseEvents of a streamed /v1/messages response."""

    __slots__ = (
        "_blocks",
        "_message",
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
        # Bytes of generated content seen so far (text, thinking, tool input): what an
        # aborted stream is billed from when its final usage never arrives.
        self.content_bytes = 0
        self.final_usage_seen = False  # message_delta carries the final output count
        self._message: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}
        self._blocks: dict[int, _Block] = {}

    def feed(self, event: SseEvent) -> None:
        """Take one event; unknown event types are ignored, malformed ones counted."""
        if event.event == "ping":
            return
        try:
            payload = orjson.loads(event.data)
            handler = _HANDLERS.get(payload.get("type") or event.event or "")
            if handler is not None:
                handler(self, payload)
        except _MALFORMED:  # orjson.JSONDecodeError is a ValueError
            self.malformed_events += 1

    def folded_message(self) -> dict[str, Any]:
        """The non-streaming Message this stream is equivalent to."""
        if not self.complete:
            raise ValueError("the stream has not completed (no message_stop seen)")
        for block in self._blocks.values():
            if not block.finish():
                self.malformed_events += 1
        message = dict(self._message)
        message["content"] = [dict(self._blocks[i].data) for i in sorted(self._blocks)]
        message["usage"] = dict(self._usage)
        return message

    def finish_reasons(self) -> list[str]:
        return finish_reasons(self._message)

    def _on_message_start(self, payload: Mapping[str, Any]) -> None:
        message = payload["message"]
        self._message = dict(message)
        model = message.get("model")
        self.model = model if isinstance(model, str) else None
        self._merge_usage(message.get("usage") or {})

    def _on_block_start(self, payload: Mapping[str, Any]) -> None:
        self._blocks[int(payload["index"])] = _Block(dict(payload["content_block"]))
        self.first_content_seen = True

    def _on_block_delta(self, payload: Mapping[str, Any]) -> None:
        block = self._blocks[int(payload["index"])]
        delta = payload["delta"]
        self.first_content_seen = True
        kind = delta["type"]
        target = _DELTA_FIELD.get(kind)
        if target is not None:
            fragment = _expect_str(delta[target[1]])
            self.content_bytes += len(fragment.encode())
            if block.field == target[0]:
                block.parts.append(fragment)
        elif kind == "signature_delta":
            block.data["signature"] = _expect_str(delta["signature"])
        elif kind == "citations_delta":
            citations = block.data.get("citations")
            if not isinstance(citations, list):
                citations = block.data["citations"] = []
            citations.append(delta["citation"])

    def _on_block_stop(self, payload: Mapping[str, Any]) -> None:
        if not self._blocks[int(payload["index"])].finish():
            self.malformed_events += 1

    def _on_message_delta(self, payload: Mapping[str, Any]) -> None:
        for key, value in (payload.get("delta") or {}).items():
            if value is not None or key != "container":  # as the SDK: null keeps container
                self._message[key] = value
        usage = payload.get("usage") or {}
        self.final_usage_seen = self.final_usage_seen or "output_tokens" in usage
        self._merge_usage(usage)

    def _on_message_stop(self, payload: Mapping[str, Any]) -> None:
        self.complete = True

    def _on_error(self, payload: Mapping[str, Any]) -> None:
        error = payload.get("error")
        self.error = dict(error) if isinstance(error, Mapping) else dict(payload)

    def _merge_usage(self, usage: Mapping[str, Any]) -> None:
        """Usage in message_delta is cumulative: a present, non-null count overwrites."""
        for key, value in usage.items():
            if value is not None or key not in self._usage:
                self._usage[key] = value
        self.usage = usage_from_mapping(self._usage)


def _expect_str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string fragment, got {type(value).__name__}")
    return value


_HANDLERS: Final[Mapping[str, Callable[[StreamAccumulator, Mapping[str, Any]], None]]] = {
    "message_start": StreamAccumulator._on_message_start,
    "content_block_start": StreamAccumulator._on_block_start,
    "content_block_delta": StreamAccumulator._on_block_delta,
    "content_block_stop": StreamAccumulator._on_block_stop,
    "message_delta": StreamAccumulator._on_message_delta,
    "message_stop": StreamAccumulator._on_message_stop,
    "error": StreamAccumulator._on_error,
}


def unfold_message(message: Mapping[str, Any]) -> bytes:
    """A Message as the SSE stream the streaming endpoint would have sent."""
    return b"".join(_unfolded_events(message))


def _unfolded_events(message: Mapping[str, Any]) -> Iterator[bytes]:
    usage = dict(message.get("usage") or {})
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 0}
    delta = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    if "stop_details" in message:
        start["stop_details"] = None
        delta["stop_details"] = message["stop_details"]
    yield _sse({"type": "message_start", "message": start})
    for index, block in enumerate(message.get("content") or ()):
        yield from _unfolded_block(index, block)
    delta_usage = {key: usage[key] for key in _DELTA_USAGE_KEYS if key in usage}
    yield _sse({"type": "message_delta", "delta": delta, "usage": delta_usage})
    yield _sse({"type": "message_stop"})


def _unfolded_block(index: int, block: Mapping[str, Any]) -> Iterator[bytes]:
    start, deltas = _split_block(block)
    yield _sse({"type": "content_block_start", "index": index, "content_block": start})
    for delta in deltas:
        yield _sse({"type": "content_block_delta", "index": index, "delta": delta})
    yield _sse({"type": "content_block_stop", "index": index})


def _split_block(block: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A content block as its content_block_start object and its deltas."""
    field = _BLOCK_FIELD.get(str(block.get("type")))
    if field == "input":
        partial = orjson.dumps(block.get("input", {})).decode()
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": partial}]
    if field == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")}]
        if "signature" in block:
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        start = {**block, "thinking": ""}
        if "signature" in block:
            start["signature"] = ""
        return start, deltas
    if field == "text":
        deltas = [{"type": "text_delta", "text": block.get("text", "")}]
        citations = block.get("citations")
        start = {**block, "text": ""}
        if isinstance(citations, list) and citations:
            start["citations"] = []
            deltas.extend({"type": "citations_delta", "citation": c} for c in citations)
        return start, deltas
    return dict(block), []


def _sse(payload: Mapping[str, Any]) -> bytes:
    return encode_event(str(payload["type"]), orjson.dumps(payload).decode())


# -- the answer's texts (output screening and unmasking walk an answer through these) ----

Path = tuple[str | int, ...]
_INPUT_BLOCKS: Final = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def answer_texts(body: Mapping[str, Any]) -> Iterator[tuple[Path, str, bool]]:
    """(path, text, is-JSON-text) for every answer text a client renders or executes:
    text, thinking and the strings of tool inputs."""
    for i, block in enumerate(body.get("content") or ()):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        for name in ("text", "thinking"):
            if kind == name and isinstance(block.get(name), str):
                yield ("content", i, name), block[name], False
        if kind in _INPUT_BLOCKS:
            found: list[tuple[Path, str]] = []
            json_strings(block.get("input"), ("content", i, "input"), found)
            yield from ((p, t, False) for p, t in found)


def screened_parts(body: Mapping[str, Any]) -> Iterator[tuple[Path, Any, str]]:
    """(path, value, kind) of each answer part output screening reads: a `text`, or a
    tool input as a `json_value`; every text of any other block (server tool results)."""
    for i, block in enumerate(body.get("content") or ()):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "thinking") and isinstance(block.get(kind), str):
            yield ("content", i, kind), block[kind], "text"
        elif kind in _INPUT_BLOCKS and "input" in block:
            yield ("content", i, "input"), block["input"], "json_value"
        else:
            for path, text in value_texts(block):
                yield ("content", i, *path), text, "text"


def answer_text(answer: Mapping[str, Any]) -> str:
    """The answer's text blocks, joined (what a structured-output schema checks)."""
    blocks = answer.get("content") or ()
    return "".join(
        b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text"
    )


def cache_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without per-run noise (`stream`, `metadata.user_id`: Claude Code puts a
    fresh session id there every run), for cache keys."""
    clean = dict(body)
    clean.pop("stream", None)
    metadata = clean.get("metadata")
    if isinstance(metadata, dict):
        rest = {k: v for k, v in metadata.items() if k != "user_id"}
        if rest:
            clean["metadata"] = rest
        else:
            clean.pop("metadata")
    return clean


def stream_error_event(error_body: bytes) -> SseEvent:
    """An error body as the `error` event that ends a stream."""
    return SseEvent("error", error_body.decode())
