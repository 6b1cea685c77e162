"""Every text of a request that reaches the model, per wire shape: one walker for all guards.

Redaction and prompt-injection scoring both read a request through `model_texts`, so a
field is either seen by both or by neither, and a block type one of them forgot cannot
slip past the other (the redesign's "dialect" owns this; see DESIGN.md).

What is walked, and how:

- Structure is known where it matters: the texts' `source` (who wrote them: the system
  prompt, tool definitions, the user, the assistant, a tool/search/fetch result, a
  document), their turn and block, so injection scoring can weigh untrusted content.
- Inside a message or a tool definition every string value is a text, in every block
  type, known or not: an unknown or new block type is scanned, never skipped. Only
  values that are not text to a model are left out: `type`, ids, signatures,
  `cache_control`, media types, base64 payloads (`source.data` of base64 images and
  documents, `data:` URLs, audio, file data) and encrypted contents.
- Keys are texts where the caller chose them: tool inputs (`tool_use`,
  `server_tool_use`, `mcp_tool_use`, OpenAI `arguments`) and JSON schemas (property
  names). Everywhere else a key is the API's own field name.
- OpenAI `arguments` are JSON inside a string: parsed, and their keys and values walked
  (`inner` is the path inside); arguments that are not JSON are one text.

Anthropic Messages: `system`, `tools` (every field of custom, server and MCP tool
definitions), `output_format`, `messages[].content` (string or blocks of any type:
text, thinking, tool_use, server_tool_use, mcp_tool_use, tool_result, mcp_tool_result,
document with its title/context/source, search_result with title/source/content,
web_search_tool_result, web_fetch_tool_result, ...). OpenAI chat completions:
`messages` (content parts of any type, `name`, `refusal`, `tool_calls`,
`function_call`), `tools`, `functions`, `response_format`, `prediction`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson

from extproc.apis.kind import ApiKind
from extproc.errors import PayloadTooLarge

__all__ = [
    "Path",
    "Source",
    "Text",
    "WalkLimits",
    "WalkMemo",
    "json_strings",
    "model_texts",
    "value_texts",
]

Path = tuple[str | int, ...]
Mode = Literal["text", "keys", "schema"]
Source = Literal["system", "tool_definition", "user", "assistant", "tool_result", "document"]

# Values that are never text to a model, whatever block they are in.
_NOT_TEXT = frozenset(
    {
        "type",
        "id",
        "tool_use_id",
        "tool_call_id",
        "signature",
        "cache_control",
        "media_type",
        "encrypted_content",
        "encrypted_index",
        "file_id",
        "role",
    }
)
# Containers whose `data` is a payload, not text (base64 sources, encrypted thinking).
_PAYLOAD_TYPES = frozenset({"base64", "redacted_thinking", "input_audio"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_PAYLOAD_KEYS = frozenset({"data", "file_data"})
_PAYLOAD_PARENTS = frozenset({"input_audio", "file"})  # OpenAI parts: {"file": {"file_data"}}
# Blocks whose `input` holds caller-chosen keys.
_INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# Untrusted content blocks in a user turn score as tool output; documents as documents.
_DOCUMENT_BLOCKS = frozenset({"document"})
_TEXT_BLOCKS = frozenset({"text", "image", "image_url", "input_audio", "file"})


class Text(NamedTuple):
    """One model-visible string: where it is, who wrote it, which turn and block (a tuple:
    a request has thousands, and a tuple is built several times faster)."""

    path: Path  # for a key: the path of its object plus the key itself
    text: str
    source: Source
    turn: int = -1  # message index; -1 for system prompt and tool definitions
    group: int = 0  # one number per block: injection scoring joins a block's texts
    inner: Path | None = None  # path inside a JSON-string value (OpenAI arguments)
    key: bool = False  # the text is an object key: rename it to change it


@dataclass(frozen=True, slots=True)
class WalkLimits:
    """A cap on the characters walked; past it `PayloadTooLarge` (too_much_text)."""

    max_chars: int = 1 << 62


MEMO_UNITS_PER_WALK = 4096

# Where a unit sat and how it was walked, and the length of its JSON (see `WalkMemo`).
UnitSpot = tuple[str, Path, Source, int, int, int]
# One walked unit: its JSON, its texts, their characters.
_Entry = tuple[bytes, tuple[Text, ...], int]


class WalkMemo:
    """The texts of units already walked: a tool list, a system prompt, one content
    block (Anthropic) or message (OpenAI), least recently used evicted.

    Agents resend the whole conversation every turn, so all but the newest blocks were
    walked before. A unit's texts depend only on its JSON value (`orjson.dumps` tells
    strings, numbers, booleans and key order apart), its path, source, turn and block
    number, and how it is walked: a hit is a unit with all of those equal, so it yields
    exactly the `Text`s the walk would (the same string objects as last time, whose hash
    is already known to the detector's cache).

    Units are found by place, not by a hash of their JSON: hashing ~120 KB of a Claude
    Code request cost as much as encoding it. The place (and the JSON's length) picks a
    few candidates, and the JSON is compared with theirs (a memcmp). At most
    `max_alike` units of one place and length are kept (different conversations at
    the same turn), so a lookup never compares more than that. Bounded by the bytes of
    the kept JSON and the number of units.
    """

    def __init__(
        self,
        max_bytes: int = 16 << 20,
        min_bytes: int = 64,
        max_items: int = 100_000,
        max_alike: int = 8,
    ) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes  # a smaller unit is walked faster than it is looked up
        self.max_items = max_items
        self.max_alike = max_alike
        # Per place: its units, the most recently used first.
        self._items: OrderedDict[UnitSpot, list[_Entry]] = OrderedDict()
        self._bytes = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0
        self._count = 0

    @property
    def size(self) -> int:
        """Bytes of the kept units' JSON."""
        return self._bytes

    def get(self, spot: UnitSpot, raw: bytes) -> tuple[tuple[Text, ...], int] | None:
        entries = self._items.get(spot)
        if entries is None:
            return None
        for index, entry in enumerate(entries):
            if entry[0] == raw:
                self._items.move_to_end(spot)
                if index:
                    entries.insert(0, entries.pop(index))
                return entry[1], entry[2]
        return None

    def put(self, spot: UnitSpot, raw: bytes, texts: tuple[Text, ...], chars: int) -> None:
        size = len(raw)
        if size > self.max_bytes:
            return
        entries = self._items.get(spot)
        if entries is None:
            entries = self._items[spot] = []
        elif any(entry[0] == raw for entry in entries):
            return
        entries.insert(0, (raw, texts, chars))
        self._bytes += size
        self._count += 1
        if len(entries) > self.max_alike:
            self._drop(entries.pop())
        while self._bytes > self.max_bytes or self._count > self.max_items:
            _, oldest = self._items.popitem(last=False)
            for entry in oldest:
                self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        self._bytes -= len(entry[0])
        self._count -= 1


def _encode(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # not JSON (a caller's own dict): walked, not kept
        return None


class _Walk:
    def __init__(self, limits: WalkLimits, tools: bool, memo: WalkMemo | None = None) -> None:
        self.out: list[Text] = []
        self.chars = 0
        self.limits = limits
        self.tools = tools
        self.memo = memo
        # A body of many thousand blocks would only churn the memo: past this many units
        # in one request the rest are walked (the same texts, without the key's cost).
        self.units_left = MEMO_UNITS_PER_WALK
        self.source: Source = "user"
        self.turn = -1
        self.group = 0

    def emit(self, path: Path, text: str, *, inner: Path | None = None, key: bool = False) -> None:
        self._count(len(text))
        self.out.append(Text(path, text, self.source, self.turn, self.group, inner, key))

    def _count(self, chars: int) -> None:
        self.chars += chars
        if self.chars > self.limits.max_chars:
            raise PayloadTooLarge(
                f"the request has over {self.limits.max_chars} characters of text to screen "
                "(limits.max_scan_chars); send less context",
                reason="too_much_text",
            )

    def block(self, source: Source, turn: int) -> None:
        self.source, self.turn, self.group = source, turn, self.group + 1

    def unit(self, how: str, value: Any, path: Path, walker: Callable[[], None]) -> None:
        """`walker()` walks `value` (at `path`, in the current block); with a memo, a
        unit walked before is taken from it instead."""
        if value is None:
            return  # an absent field (`system`, `tools`): no texts, nothing to key
        if self.memo is None or self.units_left <= 0:
            walker()
            return
        self.units_left -= 1
        raw = _encode(value)
        if raw is None or len(raw) < self.memo.min_bytes:
            walker()
            return
        spot: UnitSpot = (how, path, self.source, self.turn, self.group, len(raw))
        found = self.memo.get(spot, raw)
        if found is not None:
            texts, chars = found
            self.out.extend(texts)
            self._count(chars)
            return
        first, chars = len(self.out), self.chars
        walker()
        self.memo.put(spot, raw, tuple(self.out[first:]), self.chars - chars)

    def value(
        self, value: Any, path: Path, *, mode: Mode = "text", inner: Path | None = None
    ) -> None:
        """Every string in `value`; keys too in `keys` mode (tool inputs) and property
        names in `schema` mode (JSON schemas)."""
        stack: list[tuple[Any, Path, Mode]] = [(value, path if inner is None else inner, mode)]
        while stack:  # iterative: a deeply nested body cannot exhaust the C stack
            node, at, how = stack.pop()
            if isinstance(node, str):
                self._string(path, at, node, inner)
            elif isinstance(node, list):
                stack.extend([(node[i], (*at, i), how) for i in range(len(node) - 1, -1, -1)])
            elif isinstance(node, dict):
                members = (self._schema if how == "schema" else self._members)(
                    node, at, how, path, inner
                )
                stack.extend(reversed(members))

    def _members(
        self, node: Mapping[str, Any], at: Path, how: Mode, path: Path, inner: Path | None
    ) -> list[tuple[Any, Path, Mode]]:
        kind = node.get("type")
        kind = kind if isinstance(kind, str) else None
        payload = kind in _PAYLOAD_TYPES or bool(at and at[-1] in _PAYLOAD_PARENTS)
        members: list[tuple[Any, Path, Mode]] = []
        for k, v in node.items():
            if how == "keys":
                self._string(path, (*at, k), k, inner, key=True)
            elif k in _NOT_TEXT or (payload and k in _PAYLOAD_KEYS) or _data_url(k, v):
                continue
            input_keys = k == "input" and kind in _INPUT_BLOCKS
            members.append((v, (*at, k), "keys" if input_keys else how))
        return members

    def _schema(
        self, node: Mapping[str, Any], at: Path, how: Mode, path: Path, inner: Path | None
    ) -> list[tuple[Any, Path, Mode]]:
        """A JSON schema: keywords are the spec's, property names and values the caller's."""
        members: list[tuple[Any, Path, Mode]] = []
        for k, v in node.items():
            if k in _SCHEMA_MAPS and isinstance(v, dict):
                for name, sub in v.items():
                    self._string(path, (*at, k, name), name, inner, key=True)
                    members.append((sub, (*at, k, name), "schema"))
            elif k != "type":
                members.append((v, (*at, k), "schema"))
        return members

    def _string(
        self, path: Path, at: Path, text: str, inner: Path | None, key: bool = False
    ) -> None:
        if inner is None:
            self.emit(at, text, key=key)
        else:
            self.emit(path, text, inner=at, key=key)

    def arguments(self, raw: Any, path: Path) -> None:
        """OpenAI `arguments`: JSON in a string; its keys and values are texts."""
        if not isinstance(raw, str):
            return
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.emit(path, raw)  # not JSON: scan it as text
            return
        self.value(parsed, path, mode="keys", inner=())


def _data_url(key: str, value: Any) -> bool:
    """An inline `data:` URL (a base64 image or file) is a payload, not text."""
    return key == "url" and isinstance(value, str) and value.startswith("data:")


# -- Anthropic ---------------------------------------------------------------------------


def _anthropic(body: Mapping[str, Any], walk: _Walk) -> None:
    # Prompt order (tools, system, messages) keeps mask numbering stable across turns.
    if walk.tools:
        for name in ("tools", "output_format"):
            walk.block("tool_definition", -1)
            _definitions_unit(body.get(name), (name,), walk)
    walk.block("system", -1)
    system = body.get("system")
    walk.unit("value", system, ("system",), lambda: walk.value(system, ("system",)))
    for turn, msg in enumerate(body.get("messages") or ()):
        if isinstance(msg, dict):
            _anthropic_message(msg, turn, walk)


def _definitions_unit(value: Any, path: Path, walk: _Walk) -> None:
    walk.unit("definitions", value, path, lambda: _definitions(value, path, walk))


def _definitions(value: Any, path: Path, walk: _Walk, depth: int = 0) -> None:
    """Tool definitions and output formats: every string; schemas in schema mode. Tools
    nest their schema at most two levels down (`tools[].function.parameters`)."""
    if depth > 3 or not isinstance(value, list | dict):
        walk.value(value, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _definitions(item, (*path, i), walk, depth + 1)
    else:
        for k, v in value.items():
            if k in ("input_schema", "parameters", "schema"):
                walk.value(v, (*path, k), mode="schema")
            elif k not in _NOT_TEXT:
                _definitions(v, (*path, k), walk, depth + 1)


def _anthropic_message(msg: Mapping[str, Any], turn: int, walk: _Walk) -> None:
    role = msg.get("role")
    content = msg.get("content")
    path: Path = ("messages", turn, "content")
    if not isinstance(content, list):
        walk.block("assistant" if role == "assistant" else "user", turn)
        walk.unit("value", content, path, lambda: walk.value(content, path))
        return
    for i, block in enumerate(content):
        walk.block(_block_source(role, block), turn)
        at = (*path, i)
        walk.unit("value", block, at, lambda: walk.value(block, at))  # noqa: B023 - called now


def _block_source(role: Any, block: Any) -> Source:
    kind = block.get("type") if isinstance(block, dict) else None
    kind = kind if isinstance(kind, str) else None
    if role == "assistant":
        # A server tool's result (web search, fetch, MCP, code execution) sits in the
        # assistant's turn, but its text comes from outside: untrusted.
        return "tool_result" if kind is not None and kind.endswith("_result") else "assistant"
    if kind in _DOCUMENT_BLOCKS:
        return "document"
    if kind in _TEXT_BLOCKS or not isinstance(block, dict):
        return "user"
    return "tool_result"  # tool, search, fetch, MCP results and unknown blocks


# -- OpenAI ------------------------------------------------------------------------------


_OPENAI_DEFINITIONS = ("tools", "functions", "response_format")
_OPENAI_SOURCES: dict[str, Source] = {
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
    "tool": "tool_result",
    "function": "tool_result",
}


def _openai(body: Mapping[str, Any], walk: _Walk) -> None:
    if walk.tools:
        for name in _OPENAI_DEFINITIONS:
            walk.block("tool_definition", -1)
            _definitions_unit(body.get(name), (name,), walk)
    for turn, msg in enumerate(body.get("messages") or ()):
        if isinstance(msg, dict):
            walk.block(_OPENAI_SOURCES.get(str(msg.get("role")), "user"), turn)
            path: Path = ("messages", turn)
            walk.unit("message", msg, path, lambda: _openai_message(msg, turn, walk))  # noqa: B023
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        walk.block("assistant", -1)
        walk.value(prediction.get("content"), ("prediction", "content"))


def _openai_message(msg: Mapping[str, Any], turn: int, walk: _Walk) -> None:
    """One message's texts (its block already begun)."""
    path: Path = ("messages", turn)
    for k, v in msg.items():
        if k == "tool_calls" and isinstance(v, list):
            for j, call in enumerate(v):
                _openai_call(call, (*path, k, j), walk)
        elif k == "function_call":
            _openai_call({"function": v}, (*path, k), walk, nested=False)
        elif k == "content" and isinstance(v, list):
            for j, part in enumerate(v):
                walk.value(part, (*path, k, j))
        elif k not in _NOT_TEXT and k != "audio":
            walk.value(v, (*path, k))


def _openai_call(call: Any, path: Path, walk: _Walk, *, nested: bool = True) -> None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        walk.value(call, path)
        return
    at = (*path, "function") if nested else path
    for k, v in fn.items():
        if k == "arguments":
            walk.arguments(v, (*at, k))
        else:
            walk.value(v, (*at, k))


def value_texts(value: Any) -> list[tuple[Path, str]]:
    """Every text in one value (an answer's content block): (path inside it, text); ids,
    types, signatures, payloads and encrypted contents left out, as in requests."""
    walk = _Walk(WalkLimits(), tools=False)
    walk.value(value, ())
    return [(t.path, t.text) for t in walk.out if t.text]


def json_strings(value: Any, path: Path, out: list[tuple[Path, str]]) -> None:
    """Every string value in a JSON value (keys left out), with its path."""
    if isinstance(value, str):
        out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            json_strings(v, (*path, k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            json_strings(v, (*path, i), out)


# One request walker per wire schema (its dialect's `texts` goes through here).
_WALKERS: dict[ApiKind, Callable[[Mapping[str, Any], _Walk], None]] = {
    "anthropic": _anthropic,
    "openai": _openai,
    # Bedrock and Vertex clients send Anthropic Messages bodies (model in the URL).
    "bedrock": _anthropic,
    "vertex": _anthropic,
}


def model_texts(
    body: Mapping[str, Any],
    api: ApiKind,
    *,
    tools: bool = True,
    limits: WalkLimits | None = None,
    memo: WalkMemo | None = None,
) -> list[Text]:
    """Every model-visible text of a request, in prompt order; `tools=False` leaves out
    tool definitions and schemas. `PayloadTooLarge` past `limits.max_chars`. `memo`:
    units walked before (the same texts, without walking them again)."""
    walk = _Walk(limits or WalkLimits(), tools, memo)
    _WALKERS[api](body, walk)
    return walk.out
