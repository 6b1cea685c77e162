"""An Anthropic Messages client served by an OpenAI Chat Completions provider.

Three pure pieces, one per leg of a request:

* `to_openai_request(body, notes)`: a `/v1/messages` body as a `/v1/chat/completions`
  body. System blocks become one system message; text and image blocks become content
  parts; `tool_use` blocks become the assistant's `tool_calls` and `tool_result` blocks
  become `tool` messages (placed right after the assistant turn, as OpenAI requires,
  before the rest of the user's turn); tools, `tool_choice`, `max_tokens`,
  `stop_sequences`, `temperature`/`top_p`, `metadata.user_id` and `stream` map to their
  counterparts, and a streamed request asks for the usage chunk.
* `to_anthropic_message(completion, notes, model)`: a `chat.completion` as a Message.
* `StreamTranslator`: fed the parsed chunks of an OpenAI stream (framing-agnostic: the
  SSE framing turns bytes into chunk dicts), returns Anthropic stream events as dicts
  (`type` is the SSE event name): message_start, ping, content_block_start/delta/stop
  for text and tool_use (`input_json_delta` fragments as they arrive, several parallel
  calls by index), message_delta with stop reason and usage, message_stop; an error
  chunk becomes an `error` event.

Whatever has no OpenAI counterpart goes through `Notes` (see `extproc.translate.notes`).
Malformed input (a field of the wrong type) is a `BadRequest`, never a crash.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar

import orjson

from extproc.apis.anthropic import BILLING_PREFIX
from extproc.errors import BadRequest
from extproc.translate.common import anthropic_usage, stop_reason, stream_error_type
from extproc.translate.notes import Notes

__all__ = [
    "StreamTranslator",
    "openai_tool_name",
    "restored_names",
    "to_anthropic_message",
    "to_openai_request",
]

MaxTokensField = Literal["max_tokens", "max_completion_tokens"]

# Request keys translated below; any other top-level key is a `beta` loss.
_HANDLED: Final = frozenset(
    {
        "model", "messages", "system", "max_tokens", "stop_sequences", "temperature",
        "top_p", "top_k", "metadata", "stream", "tools", "tool_choice", "thinking",
        "output_config",
    }
)  # fmt: skip
_SERVER_BLOCKS: Final = frozenset(
    {
        "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
        "code_execution_tool_result", "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result", "mcp_tool_use", "mcp_tool_result",
        "container_upload", "tool_search_tool_result",
    }
)  # fmt: skip
# OpenAI's function names: ^[a-zA-Z0-9_-]{1,64}$ (Anthropic allows 128 characters, and
# Claude Code's MCP tools, `mcp__<server>__<tool>`, pass 64).
_FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MALFORMED: Final = (TypeError, AttributeError, KeyError, ValueError, IndexError)
_NO_NAMES: Final[Mapping[str, str]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def _shape_checked(func: F) -> F:
    """Turn a wrong-typed field deep in a body into a 400 instead of a 500."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _MALFORMED as exc:
            raise BadRequest(
                f"the request cannot be translated: a field has the wrong shape ({exc!r})",
                reason="invalid_request",
            ) from exc

    wrapper.__doc__, wrapper.__name__ = func.__doc__, func.__name__
    return wrapper  # type: ignore[return-value]


# --- request ------------------------------------------------------------------------------


def openai_tool_name(name: str) -> str:
    """`name` if OpenAI accepts it, else a stable stand-in (its first 55 safe characters,
    `_` and 8 hex of its hash); `restored_names` maps the stand-ins back in answers."""
    if _FUNCTION_NAME.fullmatch(name):
        return name
    safe = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:55]
    return f"{safe}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def restored_names(body: Mapping[str, Any]) -> dict[str, str]:
    """stand-in -> original for the tools of an Anthropic request whose names changed."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return {}
    names = (t.get("name") for t in tools if isinstance(t, Mapping))
    return {
        openai_tool_name(n): n for n in names if isinstance(n, str) and openai_tool_name(n) != n
    }


@_shape_checked
def to_openai_request(
    body: Mapping[str, Any], notes: Notes, max_tokens_field: MaxTokensField = "max_tokens"
) -> dict[str, Any]:
    """A Messages request body as a Chat Completions request body."""
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"), notes)
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body.get("messages") or ()):
        _add_message(message, f"messages[{i}]", notes, messages)
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    _sampling(body, out, notes, max_tokens_field)
    if body.get("tools"):
        tools = _tools(body["tools"], notes)
        if tools:
            out["tools"] = tools
            _tool_choice(body.get("tool_choice"), out)
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in body:
        if key not in _HANDLED:
            notes.drop("beta", key)
    return out


def _system_text(system: Any, notes: Notes, where: str = "system") -> str:
    if system is None or isinstance(system, str):
        return system or ""
    parts: list[str] = []
    for i, block in enumerate(system):
        text = block["text"]
        if i == 0 and text.startswith(BILLING_PREFIX):
            continue  # Anthropic's attribution line, stripped by position at Anthropic
        if "cache_control" in block:
            notes.drop("cache_control", f"{where}[{i}].cache_control")
        parts.append(text)
    return "\n\n".join(parts)


def _add_message(
    message: Mapping[str, Any], where: str, notes: Notes, out: list[dict[str, Any]]
) -> None:
    role, content = message["role"], message["content"]
    if role not in ("user", "assistant", "system"):
        raise BadRequest(
            f"{where}.role must be 'user', 'assistant' or 'system'", reason="invalid_request"
        )
    if role == "system":  # a system message in the conversation (Claude Code sends one)
        text = content if isinstance(content, str) else _system_text(content, notes, where)
        out.append({"role": "system", "content": text})
    elif isinstance(content, str):
        out.append({"role": role, "content": content})
    elif role == "assistant":
        out.append(_assistant(content, where, notes))
    else:
        _user(content, where, notes, out)


def _assistant(blocks: Sequence[Mapping[str, Any]], where: str, notes: Notes) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        kind, at = block["type"], f"{where}.content[{i}]"
        if "cache_control" in block:
            notes.drop("cache_control", f"{at}.cache_control")
        if kind == "text":
            texts.append(block["text"])
            if block.get("citations"):
                notes.drop("citations", f"{at}.citations")
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": openai_tool_name(block["name"]), "arguments": arguments}
            calls.append({"id": block["id"], "type": "function", "function": function})
        else:
            _drop_block(kind, at, notes)
    # null content is allowed only beside tool calls
    out: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) or (None if calls else ""),
    }
    if calls:
        out["tool_calls"] = calls
    return out


def _user(
    blocks: Sequence[Mapping[str, Any]], where: str, notes: Notes, out: list[dict[str, Any]]
) -> None:
    """Tool results first (each a `tool` message), then the rest as one user message."""
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        kind, at = block["type"], f"{where}.content[{i}]"
        if "cache_control" in block:
            notes.drop("cache_control", f"{at}.cache_control")
        if kind == "tool_result":
            out.append(_tool_message(block, at, notes, parts))
        else:
            part = _part(block, at, notes)
            if part is not None:
                parts.append(part)
    if parts:
        out.append({"role": "user", "content": _simplified(parts)})


def _tool_message(
    block: Mapping[str, Any], where: str, notes: Notes, images: list[dict[str, Any]]
) -> dict[str, Any]:
    """A tool_result as a `tool` message; its images ride in the user message after it
    (a `tool` message carries text only)."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        texts = []
        for i, inner in enumerate(content):
            part = _part(inner, f"{where}.content[{i}]", notes)
            if part is None:
                continue
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images.append(part)
        text = "\n".join(texts)
    if block.get("is_error") and not text:
        text = "error"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _part(block: Mapping[str, Any], where: str, notes: Notes) -> dict[str, Any] | None:
    kind = block["type"]
    if kind == "text":
        if block.get("citations"):
            notes.drop("citations", f"{where}.citations")
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        return _image(block["source"], where, notes)
    if kind == "document" and block["source"].get("type") == "text":
        return {"type": "text", "text": block["source"]["data"]}
    if kind == "search_result":
        texts = [c["text"] for c in block.get("content") or () if c.get("type") == "text"]
        return {"type": "text", "text": "\n".join([block.get("title", ""), *texts]).strip()}
    _drop_block(kind, where, notes)
    return None


def _image(source: Mapping[str, Any], where: str, notes: Notes) -> dict[str, Any] | None:
    if source["type"] == "base64":
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source["type"] == "url":
        url = source["url"]
    else:  # a Files API id: only Anthropic can resolve it
        notes.drop("documents", f"{where}.source ({source['type']})")
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _drop_block(kind: str, where: str, notes: Notes) -> None:
    if kind in ("thinking", "redacted_thinking"):
        notes.drop("thinking", f"{where} ({kind})")
    elif kind in _SERVER_BLOCKS:
        notes.drop("server_tools", f"{where} ({kind})")
    elif kind in ("document", "image"):
        notes.drop("documents", f"{where} ({kind})")
    else:
        notes.drop("beta", f"{where} ({kind})")


def _simplified(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string: what every OpenAI-compatible server accepts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts) if len(parts) > 1 else parts[0]["text"]
    return parts


def _sampling(
    body: Mapping[str, Any], out: dict[str, Any], notes: Notes, max_tokens_field: str
) -> None:
    if body.get("max_tokens") is not None:
        out[max_tokens_field] = body["max_tokens"]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("top_k") is not None:
        notes.drop("sampling", "top_k")
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping) and thinking.get("type") not in (None, "disabled"):
        notes.drop("reasoning", "thinking")
    _output_config(body.get("output_config"), notes)
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("user_id"), str):
        out["user"] = _user_id(metadata["user_id"])


def _output_config(config: Any, notes: Notes) -> None:
    if not isinstance(config, Mapping):
        return
    for key in config:
        category = {"effort": "reasoning", "format": "response_format"}.get(key, "beta")
        notes.drop(category, f"output_config.{key}")


def _user_id(user_id: str) -> str:
    """The caller's user id, or a stable hash of it when it is long (Claude Code sends a
    JSON object of device, account and session; OpenAI documents `user` as a short id)."""
    if len(user_id) <= 64:
        return user_id
    return "sha256:" + hashlib.sha256(user_id.encode()).hexdigest()[:48]


def _tools(tools: Sequence[Mapping[str, Any]], notes: Notes) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            notes.drop("server_tools", f"tools[{i}] ({tool['type']})")
            continue
        if "cache_control" in tool:
            notes.drop("cache_control", f"tools[{i}].cache_control")
        function: dict[str, Any] = {"name": openai_tool_name(tool["name"])}
        if tool.get("description"):
            function["description"] = tool["description"]
        function["parameters"] = tool.get("input_schema") or {"type": "object"}
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if not isinstance(choice, Mapping):
        return
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        named = {"name": openai_tool_name(choice["name"])}
        out["tool_choice"] = {"type": "function", "function": named}
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


# --- JSON answer --------------------------------------------------------------------------


def to_anthropic_message(
    completion: Mapping[str, Any],
    notes: Notes,
    model: str | None = None,
    names: Mapping[str, str] = _NO_NAMES,
) -> dict[str, Any]:
    """A `chat.completion` body as a Message (first choice; `model` overrides the
    provider's name so the caller sees the model it asked for; `names` restores tool
    names, see `restored_names`). Parts of a malformed answer that cannot be read are
    left out and noted as `malformed_answer`."""
    try:
        return _message(completion, notes, model, names)
    except _MALFORMED:
        notes.note("malformed_answer")
        return _message({}, notes, model, names)


def _message(
    completion: Mapping[str, Any], notes: Notes, model: str | None, names: Mapping[str, str]
) -> dict[str, Any]:
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], Mapping) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content") or message.get("reasoning"):
        notes.note("reasoning")
    text = message.get("content") or message.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        content.append(_tool_use(call, notes, names))
    reason = choice.get("finish_reason")
    stop = (
        "refusal" if message.get("refusal") and not message.get("content") else stop_reason(reason)
    )
    return {
        "id": _message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model or completion.get("model") or "",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage")),
    }


def _tool_use(call: Mapping[str, Any], notes: Notes, names: Mapping[str, str]) -> dict[str, Any]:
    function = call.get("function") or {}
    name = function.get("name") or ""
    return {
        "type": "tool_use",
        "id": call.get("id") or _tool_id(),
        "name": names.get(name, name),
        "input": _arguments(function.get("arguments"), notes),
    }


def _arguments(raw: object, notes: Notes) -> dict[str, Any]:
    """Tool-call arguments (a JSON string) as an input object; junk becomes `{}`, noted."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    notes.note("tool_arguments")
    return {}


_ids = itertools.count(1)


def _message_id(provider_id: object) -> str:
    suffix = provider_id if isinstance(provider_id, str) and provider_id else f"{next(_ids):024x}"
    return suffix if suffix.startswith("msg_") else f"msg_{suffix}"


def _tool_id() -> str:
    return f"toolu_gw{next(_ids):020x}"


# --- stream -------------------------------------------------------------------------------


class StreamTranslator:
    """OpenAI chunk dicts in, Anthropic event dicts out; see the module docstring.

    Blocks are opened one at a time, as Anthropic streams them: a text delta after a
    tool call opens a new text block, a new tool-call index closes the current block
    and opens a tool_use block. OpenAI, vLLM and Ollama stream parallel calls one after
    the other; a provider that interleaves them sends fragments for a call whose block is
    already closed: those are held and sent at the end of the stream (see `_flush_late`).
    """

    __slots__ = (
        "_block",
        "_finish",
        "_ids",
        "_index",
        "_late",
        "_model",
        "_names",
        "_notes",
        "_started",
        "_tools",
        "_usage",
        "done",
        "malformed_events",
    )

    def __init__(
        self, notes: Notes, model: str | None = None, names: Mapping[str, str] = _NO_NAMES
    ) -> None:
        self._notes = notes
        self._model = model
        self._names = names
        self._started = False
        self._index = -1  # index of the open Anthropic block; -1: none open
        self._block: object = None  # "text", or the OpenAI tool-call index of the open block
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> Anthropic block index
        self._ids: dict[int, str] = {}  # OpenAI tool-call index -> its id
        self._late: dict[int, list[str]] = {}
        self._finish: object = None
        self._usage: dict[str, int] = {}
        self.done = False
        self.malformed_events = 0

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Events for one parsed chunk (`{"error": ...}` chunks end the stream)."""
        if self.done:
            return []
        if chunk.get("error") is not None:
            return self.error(chunk["error"])
        out: list[dict[str, Any]] = []
        try:
            if not self._started:
                self._start(chunk, out)
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) == 0:
                    self._choice(choice, out)
            usage = chunk.get("usage")
            if usage:
                self._usage = anthropic_usage(usage)
        except _MALFORMED:  # a junk chunk is skipped (what it completed is kept), as the SDKs do
            self.malformed_events += 1
        return out

    @property
    def finish_seen(self) -> bool:
        """Whether the provider said why it stopped (a stream cut before that is truncated)."""
        return self._finish is not None

    def finish(self) -> list[dict[str, Any]]:
        """Events that end the message (on `[DONE]`, or at the end of a stream that gave
        its finish reason but no `[DONE]`)."""
        if self.done:
            return []
        out: list[dict[str, Any]] = []
        if not self._started:
            self._start({}, out)
        self._close(out)
        self._flush_late(out)
        usage = self._usage or {"output_tokens": 0}
        delta = {"stop_reason": stop_reason(self._finish), "stop_sequence": None}
        out.append({"type": "message_delta", "delta": delta, "usage": usage})
        out.append({"type": "message_stop"})
        self.done = True
        return out

    def error(self, error: object) -> list[dict[str, Any]]:
        """An `error` event for a provider error met mid-stream; the stream ends there."""
        self.done = True
        message = error.get("message") if isinstance(error, Mapping) else error
        body = {"type": stream_error_type(error), "message": str(message or "provider error")}
        return [{"type": "error", "error": body}]

    def _start(self, chunk: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        self._started = True
        message: dict[str, Any] = {
            "id": _message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model or chunk.get("model") or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append({"type": "message_start", "message": message})
        out.append({"type": "ping"})

    def _choice(self, choice: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and "reasoning" not in self._notes.dropped:  # once per stream
            self._notes.note("reasoning")
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            if self._block != "text":
                self._open(out, {"type": "text", "text": ""}, "text")
            out.append(_delta(self._index, {"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or ():
            self._tool_call(call, out)
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]

    def _tool_call(self, call: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        index = self._call_index(call)
        function = call.get("function") or {}
        if index not in self._tools:
            name = function.get("name") or ""
            start: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or _tool_id(),
                "name": self._names.get(name, name),
                "input": {},
            }
            self._open(out, start, index)
            self._tools[index] = self._index
            self._ids[index] = start["id"]
        arguments = function.get("arguments")
        if not isinstance(arguments, str) or not arguments:
            return
        if self._block == index:
            out.append(_delta(self._index, {"type": "input_json_delta", "partial_json": arguments}))
        else:
            self._late.setdefault(index, []).append(arguments)

    def _call_index(self, call: Mapping[str, Any]) -> int:
        """The call's `index`; servers that omit it (some Ollama versions) start a new call
        with a new `id`, and continue the open one without."""
        index = call.get("index")
        if index is not None:
            return int(index)
        call_id = call.get("id")
        if isinstance(self._block, int) and (not call_id or call_id == self._ids.get(self._block)):
            return self._block
        return max(self._tools, default=-1) + 1

    def _open(self, out: list[dict[str, Any]], block: dict[str, Any], key: object) -> None:
        self._close(out)
        self._index += 1
        self._block = key
        out.append({"type": "content_block_start", "index": self._index, "content_block": block})

    def _close(self, out: list[dict[str, Any]]) -> None:
        if self._block is not None:
            out.append({"type": "content_block_stop", "index": self._index})
            self._block = None

    def _flush_late(self, out: list[dict[str, Any]]) -> None:
        """Fragments for a call whose block was already closed (a provider interleaving
        parallel calls): sent, in order, as one delta for that block's index, which the
        SDKs accumulate by index, and noted as `stream_interleave` in the audit record."""
        for index, parts in self._late.items():
            self._notes.note("stream_interleave")
            block = self._tools[index]
            out.append(_delta(block, {"type": "input_json_delta", "partial_json": "".join(parts)}))
        self._late.clear()


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}
