"""Output screening: streamed answer text, whole JSON answers, structured-output schemas.

Streaming without missing a split match and without needless delay: every rule has a
`full` regex and a `partial` regex matching any prefix of a possible match that runs
to the end of the buffer (built from the rule's segments: `sk-ant-` plus up to N token
characters, a phrase word by word...). On each chunk the screener

1. finds the leftmost position `h` where some partial reaches the end of the buffer
   (only there can a match still grow): text from `h` on is held back;
2. settles matches that start before `h` (they can no longer change), applying
   redactions or stopping at a block;
3. releases everything before `h` at once.

So text that cannot start a match is never delayed, a secret split across chunks is
still caught, and any chunking yields exactly the output of the whole-text function
(property-tested). Built-in secrets and deny *phrases* hold back only a real prefix;
deny *regexes* cannot be analysed that way and hold back their `max_len` characters.

Schema enforcement uses a small, dependency-free JSON Schema subset (see
`SUPPORTED_KEYWORDS`); a schema using anything else is rejected at config load rather
than half-checked. `jsonschema` was not used: it pulls `rpds-py` (compiled) and three
more packages.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from extproc.apis.dialect import dialect_of
from extproc.apis.rewrite import JsonStrings

from .detectors import TOKEN_SPECS, Detector, TokenSpec
from .redact import Api, PathT, _apply, redaction_placeholder
from .schema import (
    SUPPORTED_KEYWORDS,
    SchemaVerdict,
    check_schema_supported,
    validate_json_schema,
    validate_structured,
)

__all__ = [
    "SUPPORTED_KEYWORDS",
    "OutputFinding",
    "OutputResult",
    "OutputRule",
    "OutputScreener",
    "SchemaVerdict",
    "ScreenedChunk",
    "StreamScreener",
    "check_schema_supported",
    "phrase_rule",
    "regex_rule",
    "validate_json_schema",
    "validate_structured",
]

_NOT_WORD = "(?<![A-Za-z0-9])"


@dataclass(frozen=True, slots=True)
class Lit:
    text: str
    ci: bool = False


@dataclass(frozen=True, slots=True)
class Cls:
    cls: str
    lo: int
    hi: int


Seg = Lit | Cls


def _lit_char(c: str, ci: bool) -> str:
    return f"(?i:{re.escape(c)})" if ci and c.isalpha() else re.escape(c)


def _seg_full(s: Seg) -> str:
    if isinstance(s, Cls):
        return f"{s.cls}{{{s.lo},{s.hi}}}"
    return "".join(_lit_char(c, s.ci) for c in s.text)


def _seg_prefix(s: Seg) -> str:
    """Any prefix of the segment (non-empty for literals)."""
    if isinstance(s, Cls):
        return f"{s.cls}{{0,{s.hi}}}"
    out = ""
    for c in reversed(s.text):
        out = f"{_lit_char(c, s.ci)}(?:{out})?" if out else _lit_char(c, s.ci)
    return out


def _closure(segs: Sequence[Seg]) -> str:
    """Regex for any non-empty prefix of a match of the segment sequence."""
    head, rest = segs[0], segs[1:]
    if not rest:
        return _seg_prefix(head)
    return f"(?:{_seg_full(head)}(?:{_closure(rest)})?|{_seg_prefix(head)})"


# ---------------------------------------------------------------- rules

# Every character a built-in token (prefix or body) can contain, PEM blocks aside.
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "_.-/+=:")
_TOKEN_CLASS = r"[A-Za-z0-9_.\-/+=:]"  # noqa: S105 - a character class, not a secret
_PEM_BEGIN = "-----BEGIN "
_PEM_UPPER, _PEM_BODY = "[A-Z0-9 ]", r"[A-Za-z0-9+/=\s\\:,.-]"
_PEM_SEGMENTS: list[Seg] = [
    Lit(_PEM_BEGIN),
    Cls(_PEM_UPPER, 0, 40),
    Lit("PRIVATE KEY"),
    Cls(_PEM_UPPER, 0, 6),
    Lit("-----"),
    Cls(_PEM_BODY, 0, 12000),
    Lit("-----END "),
    Cls(_PEM_UPPER, 0, 40),
    Lit("PRIVATE KEY"),
    Cls(_PEM_UPPER, 0, 6),
    Lit("-----"),
]
_PEM_MAX = 12200


def _token_partials(specs: Sequence[TokenSpec]) -> re.Pattern[str]:
    """Any prefix of any built-in token that runs to the end of the buffer."""
    alts = []
    for spec in specs:
        bound = sum(int(n) for n in re.findall(r"\{(?:\d+,)?(\d+)\}", spec.body)) + len(spec.body)
        for prefix in spec.prefixes:
            lead = prefix.rstrip() if spec.rule == "pem_private_key" else prefix
            segs: list[Seg] = [Lit(lead)]
            if spec.rule != "pem_private_key":
                segs.append(Cls(_TOKEN_CLASS, 0, bound))
            alts.append(_closure(segs))
    return re.compile(f"{_NOT_WORD}(?:{'|'.join(alts)})\\Z")


@dataclass(frozen=True, slots=True)
class OutputRule:
    """A deny rule. Phrases match lower-cased text; regexes the text as it is."""

    id: str
    kind: Literal["phrase", "regex"]
    full: re.Pattern[str]
    partial: re.Pattern[str] | None  # phrases only: a phrase prefix up to the end
    max_len: int
    action: str  # "redact" | "block"
    # Phrases: case-insensitive twins for text whose lower-casing changes its length.
    full_ci: re.Pattern[str] | None = None
    partial_ci: re.Pattern[str] | None = None


def phrase_rule(rule_id: str, phrase: str, action: str) -> OutputRule:
    """A case-insensitive phrase; any whitespace run (1-3 chars) between words."""
    words = phrase.lower().split()
    segs: list[Seg] = []
    for i, word in enumerate(words):
        if i:
            segs.append(Cls(r"\s", 1, 3))
        segs.append(Lit(word))
    # A literal first character (boundary check after it) keeps sre's prefix search.
    first = re.escape(words[0][0])
    left = f"(?<![a-z0-9]{first})" if words[0][0].isalnum() else ""
    right = "(?![a-z0-9])" if words[-1][-1].isalnum() else ""
    full = first + left + _seg_full(Lit(words[0][1:])) + "".join(_seg_full(s) for s in segs[1:])
    partial = f"{_NOT_WORD if left else ''}(?:{_closure(segs)})\\Z"
    bound = sum(len(w) for w in words) + 3 * len(words)
    return OutputRule(
        rule_id,
        "phrase",
        re.compile(full + right),
        re.compile(partial),
        bound,
        action,
        re.compile(full + right, re.IGNORECASE),
        re.compile(partial, re.IGNORECASE),
    )


def regex_rule(rule_id: str, pattern: str, max_len: int, action: str) -> OutputRule:
    """A user regex: its prefixes cannot be derived, so hold back `max_len` characters."""
    return OutputRule(rule_id, "regex", re.compile(pattern), None, max_len, action)


# ---------------------------------------------------------------- screening core


@dataclass(frozen=True, slots=True)
class OutputFinding:
    rule: str
    action: str
    count: int


@dataclass(frozen=True, slots=True)
class ScreenedChunk:
    """Text safe to send now; `blocked` names the rule that stopped the stream."""

    text: str
    blocked: str | None = None


@dataclass(frozen=True, slots=True)
class _Hit:
    start: int
    end: int
    rule: str
    action: str


class OutputScreener:
    """Compiled output rules of one profile; makes stream screeners, screens bodies."""

    def __init__(
        self,
        rules: Sequence[OutputRule] = (),
        *,
        strip_secrets: bool = True,
        hash_key: bytes = b"",
        specs: Sequence[TokenSpec] = TOKEN_SPECS,
    ) -> None:
        self.rules = tuple(rules)
        self.hash_key = hash_key
        ids = {spec.rule for spec in specs}
        self._tokens = Detector(ids) if strip_secrets else None
        self._token_partial = _token_partials(specs) if strip_secrets else None
        self._pem = re.compile(_closure(_PEM_SEGMENTS) + r"\Z")
        self._phrases = [r for r in self.rules if r.kind == "phrase"]
        self._regexes = [r for r in self.rules if r.kind == "regex"]
        self._phrase_window = max((r.max_len for r in self._phrases), default=0)
        self._regex_window = max((r.max_len for r in self._regexes), default=0)

    def stream(self) -> StreamScreener:
        return StreamScreener(self)

    def screen_text(self, text: str) -> tuple[ScreenedChunk, list[str]]:
        """Whole-text result: the same output a stream gives for any chunking."""
        out: list[str] = []
        hits: list[str] = []
        _, blocked = self._settle(text, 0, len(text), out, hits)
        return ScreenedChunk("".join(out), blocked), hits

    def screen_response(self, body: Mapping[str, Any], api: Api) -> OutputResult:
        """A JSON answer: secrets redacted in text and tool input; blocked if denied.

        Tool inputs and arguments are screened as JSON text string by string, decoded
        (`JsonStrings`): keys and values alike, exactly as a stream of the same answer."""
        changes: dict[PathT, Any] = {}
        hits: list[str] = []
        try:
            for path, value, kind in dialect_of(api).screened_parts(body):
                new = self._screen_part(value, kind, hits)
                if new != value:
                    changes[path] = new
        except _Blocked as stop:
            return OutputResult(None, _count(hits), stop.rule)
        if not changes and not hits:
            return _CLEAN
        new_body = _apply(dict(body), changes) if changes else None
        return OutputResult(new_body, _count(hits), None)

    def _screen_part(self, value: Any, kind: str, hits: list[str]) -> Any:
        if kind == "text":
            return _Whole(self, hits).screen(value)
        text = value if kind == "json_text" else orjson.dumps(value).decode()
        json = JsonStrings(lambda: _Whole(self, hits))
        out = json.feed(text) + json.flush()
        if out == text:
            return value
        return out if kind == "json_text" else orjson.loads(out)

    def _find(self, buf: str, pos: int) -> list[_Hit]:
        """Non-overlapping matches starting at or after `pos`, earliest (then longest) first."""
        hits: list[_Hit] = []
        if self._tokens is not None:
            hits += [
                _Hit(f.start, f.end, f.rule, "redact")
                for f in self._tokens.scan(buf, pos)
                if f.start >= pos
            ]
        if self._phrases:
            low = buf.lower()
            folded = len(low) == len(buf)
            for r in self._phrases:
                pattern = r.full if folded else r.full_ci
                target = low if folded else buf
                assert pattern is not None
                hits += [
                    _Hit(m.start(), m.end(), r.id, r.action) for m in pattern.finditer(target, pos)
                ]
        for r in self._regexes:
            hits += [
                _Hit(m.start(), m.end(), r.id, r.action)
                for m in r.full.finditer(buf, pos)
                if m.end() > m.start()
            ]
        hits.sort(key=lambda h: (h.start, h.start - h.end))
        kept: list[_Hit] = []
        for h in hits:
            if not kept or h.start >= kept[-1].end:
                kept.append(h)
        return kept

    def _settle(
        self, buf: str, pos: int, hold: int, out: list[str], hits: list[str]
    ) -> tuple[int, str | None]:
        """Apply matches that end by `hold`; append released text up to there."""
        for h in self._find(buf, pos) if hold > pos else ():
            if h.start >= hold:
                break
            if h.end > hold:  # another rule's prefix is pending inside it: wait
                hold = h.start
                break
            out.append(buf[pos : h.start])
            hits.append(f"{h.rule}\x00{h.action}")
            if h.action == "block":
                return h.start, h.rule
            out.append(redaction_placeholder(h.rule, buf[h.start : h.end], self.hash_key))
            pos = h.end
        end = max(pos, hold)
        out.append(buf[pos:end])
        return end, None

    def hold_point(self, buf: str, pos: int) -> int:
        """Leftmost position >= pos where a match may still be in progress."""
        end = len(buf)
        hold = end
        if self._token_partial is not None:
            run = end
            while run > pos and buf[run - 1] in _TOKEN_CHARS:
                run -= 1
            m = self._token_partial.search(buf, run)
            hold = m.start() if m is not None else hold
            hold = min(hold, self._pem_hold(buf, pos))
        if self._phrases:
            lo = max(pos, end - self._phrase_window)
            low = buf.lower()
            folded = len(low) == end
            for r in self._phrases:
                partial = r.partial if folded else r.partial_ci
                assert partial is not None
                m = partial.search(low if folded else buf, lo)
                hold = min(hold, m.start()) if m is not None else hold
        if self._regexes:
            hold = min(hold, max(pos, end - self._regex_window))
        return max(pos, hold)

    def _pem_hold(self, buf: str, pos: int) -> int:
        i = buf.find(_PEM_BEGIN, max(pos, len(buf) - _PEM_MAX))
        while i >= 0:
            if self._pem.match(buf, i):
                return i
            i = buf.find(_PEM_BEGIN, i + 1)
        return len(buf)


class _Blocked(Exception):
    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


class _Whole:
    """A `TextTransform` that screens all it was fed at `flush` (a whole JSON string)."""

    def __init__(self, screener: OutputScreener, hits: list[str]) -> None:
        self.screener = screener
        self.hits = hits
        self.parts: list[str] = []

    def feed(self, text: str) -> str:
        self.parts.append(text)
        return ""

    def flush(self) -> str:
        text, self.parts = "".join(self.parts), []
        return self.screen(text)

    def screen(self, text: str) -> str:
        chunk, found = self.screener.screen_text(text)
        self.hits.extend(found)
        if chunk.blocked is not None:
            raise _Blocked(chunk.blocked)
        return chunk.text


def _count(hits: Sequence[str]) -> tuple[OutputFinding, ...]:
    seen: dict[tuple[str, str], int] = {}
    for h in hits:
        rule, action = h.split("\x00")
        seen[(rule, action)] = seen.get((rule, action), 0) + 1
    return tuple(OutputFinding(r, a, n) for (r, a), n in seen.items())


@dataclass(frozen=True, slots=True)
class OutputResult:
    body: dict[str, Any] | None
    findings: tuple[OutputFinding, ...] = ()
    blocked: str | None = None


_CLEAN = OutputResult(None)  # immutable: one for every answer with nothing found

_CONTEXT = 64  # released characters kept for lookbehind boundaries


class StreamScreener:
    """Feed streamed answer text; get back what may be sent now."""

    def __init__(self, screener: OutputScreener) -> None:
        self._s = screener
        self._buf = ""
        self._pos = 0
        self._hits: list[str] = []
        self.blocked: str | None = None

    def feed(self, chunk: str) -> ScreenedChunk:
        if self.blocked is not None:
            return ScreenedChunk("", self.blocked)
        buf = self._buf + chunk
        return self._release(buf, self._s.hold_point(buf, self._pos))

    def flush(self) -> ScreenedChunk:
        """End of stream: settle and release everything held back."""
        if self.blocked is not None:
            return ScreenedChunk("", self.blocked)
        return self._release(self._buf, len(self._buf))

    @property
    def findings(self) -> tuple[OutputFinding, ...]:
        return _count(self._hits)

    def _release(self, buf: str, hold: int) -> ScreenedChunk:
        out: list[str] = []
        end, blocked = self._s._settle(buf, self._pos, hold, out, self._hits)
        if blocked is not None:
            self.blocked = blocked
            self._buf = ""
            return ScreenedChunk("".join(out), blocked)
        keep = max(0, end - _CONTEXT)
        self._buf = buf[keep:]
        self._pos = end - keep
        return ScreenedChunk("".join(out))
