"""An OpenAI Chat Completions client served by an Anthropic Messages provider.

* `to_anthropic_request(body, notes, options)`: a `/v1/chat/completions` body as a
  `/v1/messages` body. System and developer messages become `system` blocks; text,
  image and PDF parts become content blocks; the assistant's `tool_calls` become
  `tool_use` blocks and `tool` messages become `tool_result` blocks in a user turn
  (consecutive same-role turns are merged, as Anthropic requires alternation);
  tools, `tool_choice`/`parallel_tool_calls`, `max_completion_tokens`/`max_tokens`
  (Anthropic requires one: `options.default_max_tokens`), `stop`, `temperature`,
  `top_p` and `user` map across. `options.cache_prefix` marks the end of the tools,
  of the system prompt and of the conversation with `cache_control` (the long stable
  prefix an agent resends every turn), and an Anthropic-style `cache_control` a client
  put on a content part is kept.
* `to_openai_completion(message, notes, model, created)`: a Message as a `chat.completion`.
* `StreamTranslator`: parsed Anthropic events in, OpenAI chunk dicts out (and the
  string `[DONE]` last): role chunk, content deltas, `tool_calls` deltas with streamed
  argument fragments, the finish reason, and the usage chunk when the client asked for
  it (`stream_options.include_usage`); an `error` event becomes an error chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from extproc.errors import BadRequest
from extproc.translate.anthropic_on_openai import _MALFORMED, _shape_checked
from extproc.translate.common import finish_reason, openai_usage, split_data_url
from extproc.translate.notes import Notes

__all__ = [
    "DONE",
    "RequestOptions",
    "StreamTranslator",
    "to_anthropic_request",
    "to_openai_completion",
]

DONE: Final = "[DONE]"
Chunk = dict[str, Any] | Literal["[DONE]"]

_EPHEMERAL: Final = {"type": "ephemeral"}
_IGNORED: Final = frozenset({"stream_options", "store", "prediction", "modalities"})
_SAMPLING: Final = (
    "presence_penalty", "frequency_penalty", "seed", "logit_bias", "logprobs", "top_logprobs",
)  # fmt: skip
_HANDLED: Final = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "stop", "temperature",
        "top_p", "user", "stream", "tools", "tool_choice", "parallel_tool_calls", "n",
        "response_format", "reasoning_effort", "metadata", *_SAMPLING, *_IGNORED,
    }
)  # fmt: skip
_IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


@dataclass(frozen=True, slots=True)
class RequestOptions:
    default_max_tokens: int = 4096
    cache_prefix: bool = False


# --- request ------------------------------------------------------------------------------


@_shape_checked
def to_anthropic_request(
    body: Mapping[str, Any], notes: Notes, options: RequestOptions = RequestOptions()
) -> dict[str, Any]:
    """A Chat Completions request body as a Messages request body."""
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(body.get("messages") or ()):
        _add_message(message, f"messages[{i}]", notes, system, messages)
    out: dict[str, Any] = {"model": body.get("model")}
    if system:
        out["system"] = system
    out["messages"] = messages
    _sampling(body, out, notes, options)
    if body.get("tools"):
        tools = _tools(body["tools"], notes)
        if tools:
            out["tools"] = tools
            _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), out)
    if body.get("stream") is True:
        out["stream"] = True
    if options.cache_prefix:
        _mark_prefix(out)
    for key in body:
        if key not in _HANDLED:
            notes.drop("beta", key)
    return out


def _add_message(
    message: Mapping[str, Any],
    where: str,
    notes: Notes,
    system: list[dict[str, Any]],
    out: list[dict[str, Any]],
) -> None:
    role = message["role"]
    if role in ("system", "developer"):
        system.extend(_blocks(message.get("content"), where, notes))
        return
    if role == "assistant":
        blocks = _blocks(message.get("content") or message.get("refusal"), where, notes)
        blocks.extend(_tool_use(call, f"{where}.tool_calls[{j}]", notes)
                      for j, call in enumerate(message.get("tool_calls") or ()))  # fmt: skip
    elif role == "tool":
        blocks = [_tool_result(message, where, notes)]
        role = "user"
    elif role == "user":
        blocks = _blocks(message.get("content"), where, notes)
    else:
        raise BadRequest(f"{where}.role {role!r} cannot be translated", reason="invalid_request")
    if not blocks:
        return
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def _blocks(content: Any, where: str, notes: Notes) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out = []
    for i, part in enumerate(content):
        block = _block(part, f"{where}.content[{i}]", notes)
        if block is not None:
            if isinstance(part.get("cache_control"), Mapping):
                block["cache_control"] = dict(part["cache_control"])
            out.append(block)
    return out


def _block(part: Mapping[str, Any], where: str, notes: Notes) -> dict[str, Any] | None:
    kind = part["type"]
    if kind in ("text", "refusal"):
        text = part.get("text") if kind == "text" else part.get("refusal")
        return {"type": "text", "text": text} if text else None
    if kind == "image_url":
        return _image(part["image_url"]["url"], where, notes)
    if kind == "file":
        return _file(part["file"], where, notes)
    notes.drop("documents" if kind == "input_audio" else "beta", f"{where} ({kind})")
    return None


def _image(url: str, where: str, notes: Notes) -> dict[str, Any] | None:
    data = split_data_url(url)
    if data is None:
        return {"type": "image", "source": {"type": "url", "url": url}}
    media, payload = data
    if media == "application/pdf":
        return _pdf(payload)
    if media not in _IMAGE_TYPES:
        notes.drop("documents", f"{where} ({media})")
        return None
    return {"type": "image", "source": {"type": "base64", "media_type": media, "data": payload}}


def _file(file: Mapping[str, Any], where: str, notes: Notes) -> dict[str, Any] | None:
    data = split_data_url(str(file.get("file_data") or ""))
    if data is not None and data[0] == "application/pdf":
        return _pdf(data[1])
    notes.drop("documents", f"{where} (file)")
    return None


def _pdf(payload: str) -> dict[str, Any]:
    source = {"type": "base64", "media_type": "application/pdf", "data": payload}
    return {"type": "document", "source": source}


def _tool_use(call: Mapping[str, Any], where: str, notes: Notes) -> dict[str, Any]:
    function = call["function"]
    raw = function.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw)
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        notes.drop("tool_arguments", f"{where}.function.arguments")
        arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def _tool_result(message: Mapping[str, Any], where: str, notes: Notes) -> dict[str, Any]:
    content = message.get("content")
    result: Any = content if isinstance(content, str) else _blocks(content, where, notes)
    return {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": result}


def _sampling(
    body: Mapping[str, Any], out: dict[str, Any], notes: Notes, options: RequestOptions
) -> None:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = limit if limit is not None else options.default_max_tokens
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature > 1:
            notes.drop("sampling", "temperature (above 1)")
        out["temperature"] = min(float(temperature), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    for key in _SAMPLING:
        if body.get(key) not in (None, False):
            notes.drop("sampling", key)
    if body.get("n") not in (None, 1):
        notes.drop("n", "n")
    if body.get("response_format") not in (None, {"type": "text"}):
        notes.drop("response_format", "response_format")
    if body.get("reasoning_effort") is not None:
        notes.drop("reasoning", "reasoning_effort")


def _tools(tools: Sequence[Mapping[str, Any]], notes: Notes) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            notes.drop("beta", f"tools[{i}] ({tool.get('type')})")
            continue
        function = tool["function"]
        converted: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            converted["description"] = function["description"]
        converted["input_schema"] = function.get("parameters") or {
            "type": "object",
            "properties": {},
        }
        if function.get("strict") is not None:
            converted["strict"] = function["strict"]
        out.append(converted)
    return out


def _tool_choice(choice: Any, parallel: Any, out: dict[str, Any]) -> None:
    converted: dict[str, Any] | None = None
    if choice == "auto":
        converted = {"type": "auto"}
    elif choice == "required":
        converted = {"type": "any"}
    elif choice == "none":
        converted = {"type": "none"}
    elif isinstance(choice, Mapping):
        converted = {"type": "tool", "name": choice["function"]["name"]}
    if parallel is False:
        converted = converted or {"type": "auto"}
        if converted["type"] != "none":
            converted["disable_parallel_tool_use"] = True
    if converted is not None:
        out["tool_choice"] = converted


def _mark_prefix(out: dict[str, Any]) -> None:
    """`cache_control` at the end of tools, system and the conversation (3 of the 4
    breakpoints Anthropic allows), unless the client placed its own."""
    if _has_cache_control(out):
        return
    if out.get("tools"):
        out["tools"][-1] = {**out["tools"][-1], "cache_control": _EPHEMERAL}
    if out.get("system"):
        out["system"][-1] = {**out["system"][-1], "cache_control": _EPHEMERAL}
    messages = out["messages"]
    if messages and messages[-1]["content"]:
        content = messages[-1]["content"]
        content[-1] = {**content[-1], "cache_control": _EPHEMERAL}


def _has_cache_control(out: Mapping[str, Any]) -> bool:
    blocks = [*out.get("system", ()), *(b for m in out["messages"] for b in m["content"])]
    return any("cache_control" in b for b in blocks)


# --- JSON answer --------------------------------------------------------------------------


def to_openai_completion(
    message: Mapping[str, Any], notes: Notes, model: str | None = None, created: int = 0
) -> dict[str, Any]:
    """A Message as a `chat.completion` (`model` overrides the provider's name); a
    malformed answer's unreadable parts are left out, noted as `malformed_answer`."""
    try:
        return _completion(message, notes, model, created)
    except _MALFORMED:
        notes.note("malformed_answer")
        return _completion({}, notes, model, created)


def _completion(
    message: Mapping[str, Any], notes: Notes, model: str | None, created: int
) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        _answer_block(block, texts, calls, notes)
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    reply["refusal"] = None
    if calls:
        reply["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": reply,
        "logprobs": None,
        "finish_reason": finish_reason(message.get("stop_reason")),
    }
    return {
        "id": _completion_id(message.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": model or message.get("model") or "",
        "choices": [choice],
        "usage": openai_usage(message.get("usage") or {}),
    }


def _answer_block(
    block: Mapping[str, Any], texts: list[str], calls: list[dict[str, Any]], notes: Notes
) -> None:
    kind = block.get("type")
    if kind == "text":
        texts.append(str(block.get("text") or ""))
        if block.get("citations"):
            notes.note("citations")
    elif kind == "tool_use":
        arguments = orjson.dumps(block.get("input") or {}).decode()
        function = {"name": block.get("name"), "arguments": arguments}
        calls.append({"id": block.get("id"), "type": "function", "function": function})
    elif kind in ("thinking", "redacted_thinking"):
        notes.note("thinking")
    else:
        notes.note("server_tools" if "tool" in str(kind) else "beta")


def _completion_id(message_id: object) -> str:
    suffix = message_id if isinstance(message_id, str) and message_id else "gateway"
    return f"chatcmpl-{suffix.removeprefix('msg_')}"


# --- stream -------------------------------------------------------------------------------


class StreamTranslator:
    """Anthropic event dicts in, OpenAI chunk dicts out; see the module docstring."""

    __slots__ = (
        "_base",
        "_calls",
        "_created",
        "_include_usage",
        "_kinds",
        "_model",
        "_notes",
        "_usage",
        "done",
        "malformed_events",
    )

    def __init__(
        self, notes: Notes, include_usage: bool, model: str | None = None, created: int = 0
    ) -> None:
        self._notes = notes
        self._include_usage = include_usage
        self._model = model
        self._created = created
        self._base: dict[str, Any] = {}
        self._kinds: dict[int, str] = {}  # Anthropic block index -> its type
        self._calls: dict[int, int] = {}  # Anthropic block index -> OpenAI tool-call index
        self._usage: dict[str, Any] = {}
        self.done = False
        self.malformed_events = 0

    def feed(self, event: Mapping[str, Any]) -> list[Chunk]:
        """Chunks for one parsed Anthropic event."""
        if self.done:
            return []
        handler = _HANDLERS.get(str(event.get("type")))
        if handler is None:
            return []
        try:
            return handler(self, event)
        except _MALFORMED:  # a malformed event is skipped, as the SDKs do
            self.malformed_events += 1
            return []

    def finish(self) -> list[Chunk]:
        """Chunks that end the stream when it ended without `message_stop`."""
        return [] if self.done else self._on_stop({})

    def _chunk(self, delta: Mapping[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self._base, "choices": [choice]}

    def _on_start(self, event: Mapping[str, Any]) -> list[Chunk]:
        message = event["message"]
        self._base = {
            "id": _completion_id(message.get("id")),
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model or message.get("model") or "",
        }
        self._usage = dict(message.get("usage") or {})
        return [self._chunk({"role": "assistant", "content": ""})]

    def _on_block_start(self, event: Mapping[str, Any]) -> list[Chunk]:
        index, block = int(event["index"]), event["content_block"]
        kind = self._kinds[index] = str(block.get("type"))
        if kind == "text":
            text = block.get("text")
            return [self._chunk({"content": text})] if text else []
        if kind == "tool_use":
            position = self._calls[index] = len(self._calls)
            function = {"name": block.get("name"), "arguments": ""}
            call = {
                "index": position,
                "id": block.get("id"),
                "type": "function",
                "function": function,
            }
            return [self._chunk({"tool_calls": [call]})]
        self._notes.note("thinking" if "thinking" in kind else "server_tools")
        return []

    def _on_block_delta(self, event: Mapping[str, Any]) -> list[Chunk]:
        index, delta = int(event["index"]), event["delta"]
        kind = delta.get("type")
        if kind == "text_delta" and self._kinds.get(index) == "text":
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and index in self._calls:
            function = {"arguments": delta["partial_json"]}
            return [
                self._chunk({"tool_calls": [{"index": self._calls[index], "function": function}]})
            ]
        if kind == "citations_delta":
            self._notes.note("citations")
        return []

    def _on_delta(self, event: Mapping[str, Any]) -> list[Chunk]:
        for key, value in (event.get("usage") or {}).items():
            if value is not None:
                self._usage[key] = value
        reason = (event.get("delta") or {}).get("stop_reason")
        return [self._chunk({}, finish_reason(reason))] if reason is not None else []

    def _on_stop(self, event: Mapping[str, Any]) -> list[Chunk]:
        self.done = True
        out: list[Chunk] = []
        if self._include_usage:
            out.append({**self._base, "choices": [], "usage": openai_usage(self._usage)})
        out.append(DONE)
        return out

    def _on_error(self, event: Mapping[str, Any]) -> list[Chunk]:
        self.done = True
        error = event.get("error") or {}
        kind = error.get("type") if isinstance(error, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else str(error)
        body = {
            "message": message or "provider error",
            "type": kind or "server_error",
            "param": None,
            "code": kind,
        }
        return [{"error": body}]

    @staticmethod
    def _ignore(event: Mapping[str, Any]) -> list[Chunk]:
        return []


_HANDLERS: Final = {
    "message_start": StreamTranslator._on_start,
    "content_block_start": StreamTranslator._on_block_start,
    "content_block_delta": StreamTranslator._on_block_delta,
    "message_delta": StreamTranslator._on_delta,
    "message_stop": StreamTranslator._on_stop,
    "error": StreamTranslator._on_error,
}
