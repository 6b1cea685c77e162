"""Apply detector findings to a request body; reversible masking and its `Unmasker`.

What is scanned (everything that reaches the model as text):

- Anthropic Messages: `tools[].description` and every `description` inside
  `input_schema` (when `scan_tool_definitions`), `system` (string or text blocks),
  message `content` (string or blocks): `text`, `tool_use.input` (every string value,
  recursively; never keys), `tool_result.content` (string or text blocks), text
  `document` sources and `search_result` text.
- OpenAI chat completions: `tools[].function.description`/`parameters` descriptions,
  message `content` (string or `text` parts) and `tool_calls[].function.arguments`
  (a JSON string: parsed, scanned, re-serialized only if something was replaced).

Skipped: images, base64 documents, audio, `thinking`/`redacted_thinking` blocks (their
signature covers the text: changing it makes the provider reject the next turn),
ids, `cache_control`, dict keys, numbers, booleans.

The input dict is never mutated: changed containers are copied along each changed
path, so the result shares every untouched subtree with the input. When nothing is
replaced the result's `body` is None and the caller forwards the original bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .config import Action
from .detectors import BUILTIN_RULES, Detector, Finding, Kind

__all__ = [
    "Api",
    "MaskBook",
    "RedactPolicy",
    "RedactResult",
    "StreamUnmasker",
    "Unmasker",
    "Verdict",
    "collect_texts",
    "redact_request",
    "redaction_placeholder",
]

Api = Literal["anthropic", "openai"]
PathT = tuple[str | int, ...]
Applied = Literal["redact", "mask", "block", "log"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """How often one rule fired and what was done; never the matched text."""

    rule: str
    kind: Kind
    action: Applied
    count: int


@dataclass(frozen=True, slots=True)
class RedactResult:
    """`body` is None when unchanged (forward the original bytes) or when blocked."""

    body: dict[str, Any] | None
    verdicts: tuple[Verdict, ...] = ()
    blocked: str | None = None
    masks: Mapping[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.body is not None


@dataclass(frozen=True, slots=True)
class RedactPolicy:
    """A profile's resolved choices: per-rule actions, masking, hash key."""

    detector: Detector
    actions: Mapping[str, Action]
    labels: Mapping[str, str]
    mask_kinds: frozenset[Kind] = frozenset()
    hash_key: bytes = b""
    scan_tool_definitions: bool = True


# ---------------------------------------------------------------- collecting texts


@dataclass(slots=True)
class _Slot:
    path: PathT
    text: str
    inner: PathT | None = None  # path inside a JSON-string value (OpenAI arguments)


_SKIP_BLOCKS = frozenset(
    {
        "image",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
    }
)


def _json_strings(value: Any, path: PathT, out: list[tuple[PathT, str]]) -> None:
    if isinstance(value, str):
        out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _json_strings(v, (*path, k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_strings(v, (*path, i), out)


def _schema_descriptions(value: Any, path: PathT, out: list[_Slot]) -> None:
    """Every `description` string inside a JSON schema (property names are keys)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "description" and isinstance(v, str):
                out.append(_Slot((*path, k), v))
            else:
                _schema_descriptions(v, (*path, k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _schema_descriptions(v, (*path, i), out)


def _anthropic_block(block: Any, path: PathT, out: list[_Slot]) -> None:
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind in _SKIP_BLOCKS:
        return
    if kind == "text" and isinstance(block.get("text"), str):
        out.append(_Slot((*path, "text"), block["text"]))
    elif kind == "tool_use":
        found: list[tuple[PathT, str]] = []
        _json_strings(block.get("input"), (*path, "input"), found)
        out.extend(_Slot(p, t) for p, t in found)
    elif kind in ("tool_result", "search_result"):
        _anthropic_content(block.get("content"), (*path, "content"), out)
    elif kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text":
            if isinstance(source.get("data"), str):
                out.append(_Slot((*path, "source", "data"), source["data"]))
        elif isinstance(source, dict) and source.get("type") == "content":
            _anthropic_content(source.get("content"), (*path, "source", "content"), out)


def _anthropic_content(content: Any, path: PathT, out: list[_Slot]) -> None:
    if isinstance(content, str):
        out.append(_Slot(path, content))
    elif isinstance(content, list):
        for i, block in enumerate(content):
            _anthropic_block(block, (*path, i), out)


def _collect_anthropic(body: Mapping[str, Any], tools: bool) -> list[_Slot]:
    out: list[_Slot] = []
    # Prompt order (tools, system, messages) keeps mask numbering stable across turns.
    for i, tool in enumerate(body.get("tools") or () if tools else ()):
        if isinstance(tool, dict):
            if isinstance(tool.get("description"), str):
                out.append(_Slot(("tools", i, "description"), tool["description"]))
            _schema_descriptions(tool.get("input_schema"), ("tools", i, "input_schema"), out)
    _anthropic_content(body.get("system"), ("system",), out)
    for i, msg in enumerate(body.get("messages") or ()):
        if isinstance(msg, dict):
            _anthropic_content(msg.get("content"), ("messages", i, "content"), out)
    return out


def _openai_content(content: Any, path: PathT, out: list[_Slot]) -> None:
    if isinstance(content, str):
        out.append(_Slot(path, content))
    elif isinstance(content, list):
        for i, part in enumerate(content):
            if (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                out.append(_Slot((*path, i, "text"), part["text"]))


def _openai_arguments(raw: str, path: PathT, out: list[_Slot]) -> None:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        out.append(_Slot(path, raw))  # not JSON: scan it as text
        return
    found: list[tuple[PathT, str]] = []
    _json_strings(parsed, (), found)
    out.extend(_Slot(path, t, inner=p) for p, t in found)


def _openai_message(msg: Mapping[str, Any], path: PathT, out: list[_Slot]) -> None:
    _openai_content(msg.get("content"), (*path, "content"), out)
    for j, call in enumerate(msg.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            _openai_arguments(
                fn["arguments"], (*path, "tool_calls", j, "function", "arguments"), out
            )
    legacy = msg.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
        _openai_arguments(legacy["arguments"], (*path, "function_call", "arguments"), out)


def _collect_openai(body: Mapping[str, Any], tools: bool) -> list[_Slot]:
    out: list[_Slot] = []
    for i, tool in enumerate(body.get("tools") or () if tools else ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict):
            if isinstance(fn.get("description"), str):
                out.append(_Slot(("tools", i, "function", "description"), fn["description"]))
            _schema_descriptions(fn.get("parameters"), ("tools", i, "function", "parameters"), out)
    for i, msg in enumerate(body.get("messages") or ()):
        if isinstance(msg, dict):
            _openai_message(msg, ("messages", i), out)
    return out


def collect_texts(body: Mapping[str, Any], api: Api, *, tools: bool = True) -> list[str]:
    """Every text the guard scans, in prompt order (for benchmarks and other policies)."""
    slots = _collect_anthropic(body, tools) if api == "anthropic" else _collect_openai(body, tools)
    return [s.text for s in slots]


# ---------------------------------------------------------------- placeholders


def _hash4(value: str, key: bytes) -> str:
    return hashlib.blake2b(
        value.encode("utf-8", "surrogatepass"), digest_size=2, key=key
    ).hexdigest()


def redaction_placeholder(rule: str, value: str, key: bytes = b"") -> str:
    """`[REDACTED:<rule>:<4 hex>]`: same value, same hash; 16 bits cannot be reversed."""
    return f"[REDACTED:{rule}:{_hash4(value, key)}]"


_MASK_TOKEN = re.compile(r"\[([A-Z][A-Z0-9_]{0,40})_(\d{1,6})\]")


class MaskBook:
    """Per-request reversible placeholders: `[EMAIL_1]`, `[PHONE_2]`...

    The same value gets the same placeholder; numbers follow prompt order, so earlier
    turns keep their numbers as a conversation grows (prompt caching still hits).
    Numbers already used by placeholder-like text in the request are skipped.
    """

    def __init__(self, texts: Sequence[str] = ()) -> None:
        self._by_value: dict[tuple[str, str], str] = {}
        self.originals: dict[str, str] = {}
        self._next: Counter[str] = Counter()
        self._taken = {m.group(0) for t in texts if "[" in t for m in _MASK_TOKEN.finditer(t)}

    def placeholder(self, label: str, value: str) -> str:
        key = (label, value)
        if key not in self._by_value:
            token = self._fresh(label)
            self._by_value[key] = token
            self.originals[token] = value
        return self._by_value[key]

    def _fresh(self, label: str) -> str:
        while True:
            self._next[label] += 1
            token = f"[{label}_{self._next[label]}]"
            if token not in self._taken:
                return token


# ---------------------------------------------------------------- applying


def _slots_for(body: Mapping[str, Any], api: Api, tools: bool) -> list[_Slot]:
    return _collect_anthropic(body, tools) if api == "anthropic" else _collect_openai(body, tools)


def _action(policy: RedactPolicy, f: Finding) -> Applied:
    action = policy.actions.get(f.rule, "log")
    if action == "redact" and f.kind in policy.mask_kinds:
        return "mask"
    return "log" if action == "off" else action


def _replace(
    text: str, found: Sequence[Finding], policy: RedactPolicy, book: MaskBook | None
) -> str:
    parts: list[str] = []
    pos = 0
    for f in found:
        action = _action(policy, f)
        if action not in ("redact", "mask"):
            continue
        value = text[f.start : f.end]
        if action == "mask" and book is not None:
            token = book.placeholder(policy.labels.get(f.rule, f.rule.upper()), value)
        else:
            token = redaction_placeholder(f.rule, value, policy.hash_key)
        parts.append(text[pos : f.start])
        parts.append(token)
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)


def _verdicts(policy: RedactPolicy, found: Sequence[Finding]) -> tuple[Verdict, ...]:
    counts: Counter[tuple[str, Kind, Applied]] = Counter(
        (f.rule, f.kind, _action(policy, f)) for f in found
    )
    return tuple(Verdict(r, k, a, n) for (r, k, a), n in counts.items())


def redact_request(body: Mapping[str, Any], api: Api, policy: RedactPolicy) -> RedactResult:
    """Scan every model-bound text of a request; redact, mask, block or log per rule."""
    slots = _slots_for(body, api, policy.scan_tool_definitions)
    hits = policy.detector.scan_many([s.text for s in slots])
    if not hits:
        return RedactResult(None)
    by_slot: dict[int, list[Finding]] = {}
    for i, f in hits:
        by_slot.setdefault(i, []).append(f)
    all_found = [f for _, f in hits]
    verdicts = _verdicts(policy, all_found)
    blocked = next((f.rule for f in all_found if _action(policy, f) == "block"), None)
    if blocked is not None:
        return RedactResult(None, verdicts, blocked)
    if not any(v.action in ("redact", "mask") for v in verdicts):
        return RedactResult(None, verdicts)
    book = MaskBook([s.text for s in slots]) if policy.mask_kinds else None
    new_body = _rebuild(body, slots, by_slot, policy, book)
    return RedactResult(new_body, verdicts, None, dict(book.originals) if book else {})


def _rebuild(
    body: Mapping[str, Any],
    slots: Sequence[_Slot],
    by_slot: Mapping[int, Sequence[Finding]],
    policy: RedactPolicy,
    book: MaskBook | None,
) -> dict[str, Any]:
    changes: dict[PathT, Any] = {}
    inner: dict[PathT, dict[PathT, str]] = {}
    for i in sorted(by_slot):
        slot = slots[i]
        new = _replace(slot.text, by_slot[i], policy, book)
        if new == slot.text:
            continue
        if slot.inner is None:
            changes[slot.path] = new
        else:
            inner.setdefault(slot.path, {})[slot.inner] = new
    for path, edits in inner.items():
        parsed = orjson.loads(_get(body, path))
        changes[path] = orjson.dumps(_apply(parsed, edits)).decode()
    rebuilt: dict[str, Any] = _apply(dict(body), changes)
    return rebuilt


def _get(node: Any, path: PathT) -> Any:
    for key in path:
        node = node[key]
    return node


def _apply(root: Any, changes: Mapping[PathT, Any]) -> Any:
    """Copy-on-write: copy only the containers on changed paths."""
    tree: dict[Any, Any] = {}
    for path, value in changes.items():
        if not path:
            return value
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _Leaf(value)
    return _apply_tree(root, tree)


@dataclass(frozen=True, slots=True)
class _Leaf:
    value: Any


def _apply_tree(node: Any, tree: Mapping[Any, Any]) -> Any:
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    for key, sub in tree.items():
        copy[key] = sub.value if isinstance(sub, _Leaf) else _apply_tree(node[key], sub)
    return copy


# ---------------------------------------------------------------- unmasking


class Unmasker:
    """Restores `[EMAIL_1]`-style placeholders in the model's answer."""

    def __init__(self, originals: Mapping[str, str]) -> None:
        self.originals = dict(originals)
        self._escaped = {k: orjson.dumps(v).decode()[1:-1] for k, v in self.originals.items()}
        self._prefixes = {k[:i] for k in self.originals for i in range(1, len(k))}
        self._longest = max((len(k) for k in self.originals), default=0)

    def text(self, value: str, *, json_escape: bool = False) -> str:
        if not self.originals or "[" not in value:
            return value
        table = self._escaped if json_escape else self.originals
        return _MASK_TOKEN.sub(lambda m: table.get(m.group(0), m.group(0)), value)

    def response(self, body: Mapping[str, Any], api: Api) -> dict[str, Any] | None:
        """A JSON answer with placeholders restored, or None if nothing changed."""
        if not self.originals:
            return None
        changes = dict(self._changes(body, api))
        return _apply(dict(body), changes) if changes else None

    def _changes(self, body: Mapping[str, Any], api: Api) -> Iterator[tuple[PathT, str]]:
        for path, text, escape in _answer_texts(body, api):
            new = self.text(text, json_escape=escape)
            if new != text:
                yield path, new

    def stream(self, *, json_escape: bool = False) -> StreamUnmasker:
        """One per streamed content block (text deltas, or partial JSON with escaping)."""
        return StreamUnmasker(self, json_escape)

    def holds(self, tail: str) -> bool:
        return tail in self._prefixes


class StreamUnmasker:
    """Incremental unmasking: holds back only a possible placeholder prefix."""

    def __init__(self, unmasker: Unmasker, json_escape: bool) -> None:
        self._u = unmasker
        self._escape = json_escape
        self._buf = ""

    def feed(self, delta: str) -> str:
        buf = self._buf + delta
        cut = len(buf)
        i = buf.rfind("[", max(0, len(buf) - self._u._longest))
        if i >= 0 and self._u.holds(buf[i:]):
            cut = i
        self._buf = buf[cut:]
        return self._u.text(buf[:cut], json_escape=self._escape)

    def flush(self) -> str:
        out, self._buf = self._u.text(self._buf, json_escape=self._escape), ""
        return out


def _answer_texts(body: Mapping[str, Any], api: Api) -> Iterator[tuple[PathT, str, bool]]:
    """(path, text, is-JSON-text) for every answer text a placeholder may appear in."""
    if api == "anthropic":
        for i, block in enumerate(body.get("content") or ()):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                yield ("content", i, "text"), block["text"], False
            elif block.get("type") == "tool_use":
                found: list[tuple[PathT, str]] = []
                _json_strings(block.get("input"), ("content", i, "input"), found)
                yield from ((p, t, False) for p, t in found)
        return
    for i, choice in enumerate(body.get("choices") or ()):
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("content"), str):
            yield ("choices", i, "message", "content"), msg["content"], False
        for j, call in enumerate(msg.get("tool_calls") or ()):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                path = ("choices", i, "message", "tool_calls", j, "function", "arguments")
                yield path, fn["arguments"], True


_ = BUILTIN_RULES  # labels for built-in rules come from here via the policy
