"""Apply detector findings to a request body; reversible masking and its `Unmasker`.

What is scanned: every text that reaches the model, as `extproc.apis.walk` finds it
(the one walker injection scoring uses too): system prompt, tool definitions and their
schemas (when `scan_tool_definitions`), every string of every content block of every
type, known or not, including `thinking`, tool inputs' keys and values, document and
search-result titles, fetched pages, OpenAI `refusal`, `prediction` and `arguments`
(a JSON string: parsed, scanned, re-serialized only if something was replaced).
A changed key is renamed in place. A redacted `thinking` block no longer matches its
signature: the provider may refuse that turn, which still keeps the secret in.

Skipped: ids, types, signatures, `cache_control`, media types, base64 payloads and
encrypted contents (see `extproc.apis.walk`).

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

from extproc.apis.dialect import dialect_of
from extproc.apis.kind import ApiKind
from extproc.apis.walk import Text, WalkLimits, model_texts

from .config import Action
from .detectors import BUILTIN_RULES, Detector, Finding, Kind

__all__ = [
    "Api",
    "Edit",
    "MaskBook",
    "RedactPlan",
    "RedactPolicy",
    "RedactResult",
    "StreamUnmasker",
    "Unmasker",
    "Verdict",
    "apply_plan",
    "collect_texts",
    "plan_redaction",
    "redact_request",
    "redaction_placeholder",
]

Api = ApiKind  # the wire schema a body is in (`extproc.apis.kind`)
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


def collect_texts(body: Mapping[str, Any], api: Api, *, tools: bool = True) -> list[str]:
    """Every text the guard scans, in prompt order (for benchmarks and other policies)."""
    return [t.text for t in model_texts(body, api, tools=tools)]


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


@dataclass(frozen=True, slots=True)
class Edit:
    """One text to replace: where (as in `walk.Text`) and with what."""

    path: PathT
    new: str
    inner: PathT | None = None
    key: bool = False


@dataclass(frozen=True, slots=True)
class RedactPlan:
    """What to change, small enough to send back from a worker process; `apply_plan`
    turns it into the new body."""

    edits: tuple[Edit, ...] = ()
    verdicts: tuple[Verdict, ...] = ()
    blocked: str | None = None
    masks: Mapping[str, str] = field(default_factory=dict)


def redact_request(
    body: Mapping[str, Any], api: Api, policy: RedactPolicy, limits: WalkLimits | None = None
) -> RedactResult:
    """Scan every model-bound text of a request; redact, mask, block or log per rule."""
    texts = model_texts(body, api, tools=policy.scan_tool_definitions, limits=limits)
    return apply_plan(body, plan_redaction(texts, policy))


def plan_redaction(texts: Sequence[Text], policy: RedactPolicy) -> RedactPlan:
    """The findings in `texts` (from `model_texts`) and the edits they call for."""
    hits = policy.detector.scan_many([t.text for t in texts])
    if not hits:
        return _NOTHING_FOUND
    by_slot: dict[int, list[Finding]] = {}
    for i, f in hits:
        by_slot.setdefault(i, []).append(f)
    all_found = [f for _, f in hits]
    verdicts = _verdicts(policy, all_found)
    blocked = next((f.rule for f in all_found if _action(policy, f) == "block"), None)
    if blocked is not None or not any(v.action in ("redact", "mask") for v in verdicts):
        return RedactPlan((), verdicts, blocked)
    book = MaskBook([t.text for t in texts]) if policy.mask_kinds else None
    edits = []
    for i in sorted(by_slot):
        text = texts[i]
        new = _replace(text.text, by_slot[i], policy, book)
        if new != text.text:
            edits.append(Edit(text.path, new, text.inner, text.key))
    return RedactPlan(tuple(edits), verdicts, None, dict(book.originals) if book else {})


# Immutable (frozen, masks only read): one each for every request with nothing found.
_NOTHING_FOUND = RedactPlan()
_UNCHANGED = RedactResult(None)


def apply_plan(body: Mapping[str, Any], plan: RedactPlan) -> RedactResult:
    if plan is _NOTHING_FOUND:
        return _UNCHANGED
    if plan.blocked is not None or not plan.edits:
        return RedactResult(None, plan.verdicts, plan.blocked)
    return RedactResult(_rebuild(body, plan.edits), plan.verdicts, None, plan.masks)


Rename = tuple[PathT, str, str]  # (object path, old key, new key)


def _rebuild(body: Mapping[str, Any], edits: Sequence[Edit]) -> dict[str, Any]:
    changes: dict[PathT, Any] = {}
    renames: list[Rename] = []
    inner: dict[PathT, tuple[dict[PathT, str], list[Rename]]] = {}
    for edit in edits:
        if edit.inner is None:
            _record(edit.path, edit.new, edit.key, changes, renames)
        else:
            values, keys = inner.setdefault(edit.path, ({}, []))
            _record(edit.inner, edit.new, edit.key, values, keys)
    for path, (values, keys) in inner.items():
        parsed = orjson.loads(_get(body, path))
        changes[path] = orjson.dumps(_apply(parsed, values, keys)).decode()
    rebuilt: dict[str, Any] = _apply(dict(body), changes, renames)
    return rebuilt


def _record(
    path: PathT, new: str, key: bool, changes: dict[PathT, Any], renames: list[Rename]
) -> None:
    if key:
        renames.append((path[:-1], str(path[-1]), new))
    else:
        changes[path] = new


def _get(node: Any, path: PathT) -> Any:
    for key in path:
        node = node[key]
    return node


_RENAME = object()  # in a change tree: the key renames of that object


def _apply(root: Any, changes: Mapping[PathT, Any], renames: Sequence[Rename] = ()) -> Any:
    """Copy-on-write: copy only the containers on changed paths, once each (linear in
    the changes however many share a container); renamed keys keep their place."""
    if not changes and not renames:
        return root
    tree: dict[Any, Any] = {}
    for path, value in changes.items():
        if not path:
            return value
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _Leaf(value)
    for path, old, new in renames:
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node.setdefault(_RENAME, {})[old] = new
    return _apply_tree(root, tree)


@dataclass(frozen=True, slots=True)
class _Leaf:
    value: Any


def _apply_tree(node: Any, tree: Mapping[Any, Any]) -> Any:
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    for key, sub in tree.items():
        if key is not _RENAME:
            copy[key] = sub.value if isinstance(sub, _Leaf) else _apply_tree(node[key], sub)
    names = tree.get(_RENAME)
    if names:
        copy = {names.get(k, k): v for k, v in copy.items()}
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
        for path, text, escape in dialect_of(api).answer_texts(body):
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


_ = BUILTIN_RULES  # labels for built-in rules come from here via the policy
