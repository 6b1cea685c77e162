"""Prompt-injection / jailbreak screening of untrusted content: scored, documented rules.

A regex screen is a tripwire, not a boundary: it catches the common, copy-pasted
attacks (instruction overrides, persona jailbreaks, prompt exfiltration, hidden
markers, invisible-Unicode and base64 smuggling) cheaply and explains itself, and a
paraphrase will get past it. Precision/recall on tests/data/injection_set.jsonl are
in bench/GUARD.md.

Scoring: each rule has a weight in 0..1. A hit inside quotes, backticks or a code fence
counts 0.4x, and a text that is visibly *about* prompt injection (security reviews,
detector tests, OWASP notes) counts 0.5x; text written to an AI is not quoted.
Rules combine as a noisy-OR, `1 - prod(1 - w)`, so one strong rule (0.9) or two
medium ones (0.7 + 0.5 -> 0.85) cross the default threshold of 0.8, while one weak or
quoted signal does not. A request's score is the maximum over its untrusted items.

Speed: phrase regexes with many alternatives are slow in `re` (no first-character
prefilter), so each rule has trigger words. One pass (`bytes.translate` + `split` +
set intersection) finds which triggers occur; a rule's regex then runs only in windows
around its triggers' occurrences. A rule led by punctuation (`<`, `[`, a newline) runs
only when its lead occurs (found in the same Hyperscan pass as the words).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from extproc.apis.walk import Text, model_texts

from . import shapescan
from .detectors import TextCache, _width
from .redact import Api
from .shapescan import WordScanner

__all__ = [
    "INJECTION_RULES",
    "InjectionRule",
    "InjectionScreener",
    "InjectionVerdict",
    "TextScore",
    "score_text",
]

Source = Literal["tool_result", "document", "user"]


@dataclass(frozen=True, slots=True)
class InjectionRule:
    """A scored rule: alternatives, each led by a literal word or marker."""

    id: str
    weight: float
    alternatives: tuple[tuple[str, str], ...]  # (leading words, rest of the pattern)
    description: str


def _rule(rule_id: str, weight: float, doc: str, *alts: tuple[str, str]) -> InjectionRule:
    return InjectionRule(rule_id, weight, alts, doc)


_STRONG_QUAL = (
    r"(?:previous|prior|above|earlier|preceding|original|initial|system|your|developer|"
    r"safety|existing|old|current|above-mentioned)"
)
_NOUN = (
    r"(?:instructions?|prompts?|rules|directions|directives|guidelines|guardrails|"
    r"constraints|programming|policies|restrictions|context|commands|orders|messages)"
)
_STRONG_NOUN = r"(?:instructions|prompts?|guidelines|guardrails|directives|programming)"
_W = r"(?:[a-z'-]+\s+)"
_AI = r"(?:ai|a\.i\.|llm|language\s+model|assistant|agent|chatbot|claude|chatgpt|gpt|copilot)"
_EXFIL_TARGET = (
    r"(?:(?:system|initial|hidden|original|secret|developer)\s+(?:prompt|message|instructions?)"
    r"|instructions\s+(?:above|you\s+were\s+given)|prompt\s+above)"
)
_EXFIL_VERBS = (
    "reveal print show repeat output display leak dump disclose write copy paste return send"
)
_EXFIL_HEAD = r"\s+(?:me\s+)?(?:all\s+)?(?:of\s+)?"
_TELL = r"\s+me\s+(?:all\s+)?(?:of\s+)?"
_GIVEN = r"(?=[^.\n]{0,30}(?:you\s+were\s+given|verbatim|word\s+for\s+word))"
_HIDE = (
    r"\s+(?:tell(?:ing)?|inform(?:ing)?|mention(?:ing)?|reveal(?:ing)?|alert(?:ing)?|"
    r"notify(?:ing)?|show(?:ing)?|ask(?:ing)?)\s+(?:this\s+)?(?:to\s+)?(?:the\s+)?"
    r"(?:user|human|operator)\b"
)
_DATA = (
    r"\s+(?:the\s+|all\s+|any\s+|your\s+|my\s+)*(?:conversation|chat\s+history|secrets?|"
    r"credentials|api\s+keys?|tokens?|env(?:ironment)?\s+variables|\.env|ssh\s+keys?|"
    r"passwords?)\b[^\n]{0,40}?\s(?:to|at)\s+(?:https?://|[a-z0-9.-]+\.[a-z]{2,}\b|\S+@)"
)

INJECTION_RULES: tuple[InjectionRule, ...] = (
    _rule(
        "ignore_previous",
        0.9,
        "orders to drop earlier/system instructions",
        (
            "ignore disregard forget override bypass",
            rf"\s+(?:{_W}{{0,3}}?{_STRONG_QUAL}\s+{_W}{{0,2}}?{_NOUN}|{_W}{{0,3}}?{_STRONG_NOUN}"
            r"|(?:everything|anything|all)\s+(?:above|before|previously|prior)"
            rf"|{_W}{{0,4}}?you\s+(?:were|have\s+been)\s+(?:given|told))\b",
        ),
    ),
    _rule(
        "ignore_previous_i18n",
        0.9,
        "the same order in French, German, Spanish",
        (
            "ignorez ignorer oubliez",
            r"\s+(?:toutes\s+)?(?:les\s+)?instructions\s+pr[ée]c[ée]dentes",
        ),
        ("ignoriere vergiss", r"\s+(?:alle\s+)?(?:vorherigen|bisherigen)\s+anweisungen"),
        ("ignora olvida", r"\s+(?:todas\s+)?(?:las\s+)?instrucciones\s+anteriores"),
    ),
    _rule(
        "new_instructions",
        0.8,
        "replaces the task or role",
        ("new updated real actual true revised", r"\s+(?:system\s+)?instructions?\s*:"),
        (
            "your",
            r"\s+(?:new|real|true|actual)\s+(?:task|role|goal|instructions?|purpose|"
            r"objective|job)\b",
        ),
    ),
    _rule(
        "from_now_on",
        0.4,
        "re-scopes future behaviour (weak: users say it too)",
        ("from", r"\s+now\s+on,?\s+(?:you|your|the\s+assistant)\b"),
    ),
    _rule(
        "role_override",
        0.8,
        "persona switch away from the assistant's rules",
        (
            "you",
            r"\s+are\s+(?:no\s+longer\b|now\s+(?:an?\s+)?(?:unrestricted|unfiltered|"
            r"uncensored|jailbroken|free|evil|dan|operating\s+without|in\s+(?:dan|"
            r"developer|god)\s+mode))",
        ),
        (
            "pretend",
            r"\s+(?:to\s+be|you\s+are|that\s+you)\b[^.\n]{0,80}\b(?:no|without|any)\s+"
            r"(?:restrictions|limits|rules|filters|guidelines)",
        ),
    ),
    _rule(
        "role_play",
        0.4,
        "weak persona signals",
        ("you", r"\s+are\s+now\s+(?!in\s+(?:plan|auto))"),
        (
            "act behave respond",
            r"\s+as\s+(?:if\s+you\s+(?:are|were)\s+)?(?:an?\s+)?(?:"
            r"unrestricted|unfiltered|uncensored|jailbroken|evil|malicious"
            r"|rogue|dan)\b",
        ),
        ("stay", r"\s+in\s+character\b"),
    ),
    _rule(
        "jailbreak_persona",
        0.85,
        "named jailbreak personas (DAN, developer mode ...)",
        ("do", r"\s+anything\s+now\b"),
        ("dan", r"\s+mode\b"),
        ("developer", r"\s+mode\s+(?:enabled|output|on)\b"),
        ("jailbreak jailbroken", r"\s+(?:mode|assistant|ai)\b"),
        (
            "no",
            r"\s+(?:ethical|moral|content)\s+(?:guidelines|restrictions|filters|limits|"
            r"constraints)\b",
        ),
        (
            "without",
            r"\s+any\s+(?:ethical|moral|content)\s+(?:guidelines|restrictions|"
            r"filters|limits|constraints)\b",
        ),
        ("unfiltered", r"\s+(?:ai|assistant|model|responses?)\b"),
        ("evil", r"\s+(?:confidant|twin|mode)\b"),
        ("opposite", r"\s+mode\b"),
    ),
    _rule(
        "system_prompt_exfil",
        0.85,
        "asks for *your* system prompt / hidden instructions",
        (
            _EXFIL_VERBS,
            rf"{_EXFIL_HEAD}(?:your\s+(?:[a-z]+\s+){{0,3}}?{_EXFIL_TARGET}"
            rf"|the\s+(?:[a-z]+\s+){{0,3}}?{_EXFIL_TARGET}{_GIVEN})",
        ),
        (
            "tell give",
            rf"{_TELL}(?:your\s+(?:[a-z]+\s+){{0,3}}?{_EXFIL_TARGET}"
            rf"|the\s+(?:[a-z]+\s+){{0,3}}?{_EXFIL_TARGET}{_GIVEN})",
        ),
        ("repeat", r"\s+(?:the\s+)?(?:words|text|everything)\s+above\b"),
        (
            "what",
            r"\s+(?:is|are|was|were)\s+your\s+(?:system\s+prompt|initial\s+instructions|"
            r"original\s+instructions)",
        ),
    ),
    _rule(
        "system_prompt_mention",
        0.45,
        "mentions printing a system prompt (weak: debugging code does this)",
        (_EXFIL_VERBS, rf"{_EXFIL_HEAD}the\s+(?:[a-z]+\s+){{0,3}}?{_EXFIL_TARGET}"),
        ("tell give", rf"{_TELL}the\s+(?:[a-z]+\s+){{0,3}}?{_EXFIL_TARGET}"),
    ),
    _rule(
        "secrecy",
        0.85,
        "hides actions from the user",
        ("never without", _HIDE),
        ("do", r"\s+not" + _HIDE),
        ("don", r"'?t" + _HIDE),
        (
            "the",
            r"\s+user\s+(?:must|should|will)\s+(?:not|never)\s+(?:know|see|find\s+out|"
            r"be\s+told)",
        ),
        ("keep hide", r"\s+(?:this|it)\s+(?:secret\s+)?from\s+the\s+user\b"),
        ("silently", r"\s+(?:run|execute|send|upload|exfiltrate|include|append|post)\b"),
    ),
    _rule(
        "ai_addressed",
        0.5,
        "text in content that speaks to the AI reading it",
        (
            "note message instruction instructions attention important reminder",
            rf"\s+(?:to|for)\s+(?:the\s+|any\s+|all\s+)?{_AI}s?\b",
        ),
        (
            "if",
            r"\s+you\s+are\s+(?:an?\s+)?(?:ai|llm|language\s+model|ai\s+assistant|ai\s+agent"
            r"|automated\s+agent|claude|chatgpt)\b",
        ),
        (
            "ai llm",
            r"\s+(?:agents?|assistants?|models?|reviewers?)\s*(?::|(?:reading|"
            r"processing|parsing|summari[sz]ing|viewing)\s+this\b)",
        ),
    ),
    _rule(
        "chat_template",
        0.85,
        "chat-template / role markers smuggled into content",
        (
            "<",
            r"(?:\|(?:im_start|im_end|system|user|assistant|endoftext|start_header_id)\|>"
            r"|</?sys>>|/?(?:system|instructions)>)",
        ),
        ("[", r"/?inst\]"),
        ("\n", r"(?:\n(?:human|assistant)\s*:|#{2,3}\s*(?:system|instruction)s?\s*:)"),
    ),
    _rule(
        "hidden_html_instruction",
        0.85,
        "instructions hidden in an HTML comment",
        (
            "<!--",
            r"[^>]{0,400}?(?:\bignore\s+(?:all|previous|prior|above|the|your)|"
            rf"\binstructions?\s+(?:for|to)\s+(?:the\s+)?{_AI}|\b(?:ai|assistant|llm|"
            r"agent|claude)\s*[:,]|\byou\s+(?:must|should|will)\s+now\b|\bsystem\s+prompt)",
        ),
    ),
    _rule(
        "exfil_url",
        0.85,
        "sends data to an outside address",
        ("![", r"[^\]\n]{0,100}\]\(https?://[^)\s]{1,300}[?&][a-z_]{1,20}=(?:\{|\$|%7b|<)"),
        ("send post upload exfiltrate forward transmit leak", _DATA),
    ),
    _rule(
        "tool_hijack",
        0.8,
        "urges an immediate, unconfirmed command run",
        (
            "run execute call invoke",
            r"\s+(?:the\s+)?(?:following|this|these)\s+(?:commands?|code|script|tool)s?\s+"
            r"(?:immediately|silently|without\s+(?:asking|confirmation|telling)|before\s+"
            r"(?:answering|responding|anything)|now\s+before)",
        ),
    ),
    _rule(
        "decode_and_follow",
        0.8,
        "asks to decode and obey hidden content",
        (
            "decode",
            r"\s+(?:this|the\s+following|it)\b[^.\n]{0,60}\b(?:follow|execute|run|obey"
            r"|do)\b",
        ),
        ("base64 b64", r"[- ]?(?:encoded\s+)?(?:instructions?|commands?|prompt)\b"),
    ),
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: InjectionRule
    word: bytes | None  # None: a punctuation marker, always searched
    pattern: re.Pattern[str]
    lead: str = ""  # the literal every match starts with ("" : none)

    def first(self, low: str) -> re.Match[str] | None:
        """The leftmost match in `low` (what `pattern.search` gives).

        Every match starts with `lead`, so trying `match` where `str.find` sees it finds
        the same one: on a long tool result, `find` skips text many times faster than
        sre's literal-prefix search (~1 ms per rule per MB). A lead that keeps occurring
        without a match hands over to `search` after a budget of attempts.
        """
        if not self.lead:
            return self.pattern.search(low)
        match, lead = self.pattern.match, self.lead
        budget = 16 + (len(low) >> 11)
        at = low.find(lead)
        while at >= 0:
            if budget == 0:
                return self.pattern.search(low, at)
            budget -= 1
            m = match(low, at)
            if m is not None:
                return m
            at = low.find(lead, at + 1)
        return None


def _compile_rules() -> tuple[_Compiled, ...]:
    """One regex per leading word or marker: a literal prefix gets sre's fast search.

    A word-led regex runs only when its word occurs in the text (see `_words`).
    """
    out = []
    for rule in INJECTION_RULES:
        for words, rest in rule.alternatives:
            for word in words.split(" ") if words.strip() else [words]:
                lead = re.escape(word)
                is_word = word.isalnum()
                guard = f"(?<![a-z0-9_]{lead})" if is_word else ""
                key = word.encode() if is_word else None
                pattern = re.compile(f"{lead}{guard}(?:{rest})")
                out.append(_Compiled(rule, key, pattern, word))
    return tuple(out)


_COMPILED = _compile_rules()
_B64_HINTS = ("base64", "b64", "decode", "atob", "encoded")
_LOOKED_FOR = [c.word for c in _COMPILED if c.word is not None] + [h.encode() for h in _B64_HINTS]
# The punctuation that leads the other rules (`<`, `[`, a newline, `<!--`, `![`): a rule
# whose lead does not occur cannot match, so it is not tried.
_MARKS = tuple(dict.fromkeys(c.lead.encode() for c in _COMPILED if c.word is None))
_WORD_SCANNER = WordScanner(_LOOKED_FOR, _MARKS) if shapescan.available() else None
# Below ~200 bytes `translate` + `split` + a set of every token is cheaper than a Hyperscan
# call (~2 µs); a 2 KB prompt splits in ~11 µs against ~3 µs.
_WORD_SCANNER_MIN = 192

_EXTRA = {
    "invisible_tag_chars": 0.95,  # Unicode tag block: ASCII smuggling; never in normal text
    "bidi_override": 0.8,  # Trojan-Source reordering (RLO/LRO/isolates), not RLM/LRM
    "zero_width_run": 0.6,  # >= 3 zero-width spaces/joiners (ZWJ in emoji is not counted)
    "encoded_instruction": 0.85,  # base64 that decodes to an injection phrase
}
RULE_WEIGHTS: dict[str, float] = {r.id: r.weight for r in INJECTION_RULES} | _EXTRA

_META_WORDS = (
    "prompt injection",
    "prompt-injection",
    "injection attack",
    "jailbreak detection",
    "jailbreak prompts",
    "jailbreak attempt",
    "detect",
    "classifier",
    "test case",
    "test_case",
    "red team",
    "red-team",
    "security review",
    "owasp",
    "llm01",
    "adversarial",
    "malicious input",
    "malicious prompt",
    "payload",
)
_TAGS = re.compile("[\U000e0000-\U000e007f]")
_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_ZERO_WIDTH = "\u200b\u200c\u2060\u2061\u2062\u2063\u2064\ufeff"
_B64 = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")
_B64_WINDOW = 600
_NOT_WORD = bytes(c for c in range(128) if not (chr(c).isalnum() or chr(c) == "_"))
_SPLIT = bytes.maketrans(_NOT_WORD, b" " * len(_NOT_WORD))


@dataclass(frozen=True, slots=True)
class TextScore:
    score: float
    rules: tuple[str, ...]


_QUOTE_SPAN = 80


def _quoted(low: str, pos: int) -> bool:
    """A *mention*: in a code fence, in backticks, or in a short quote on its line.

    Long quoted strings are not damped: JSON tool output quotes whole attack sentences.
    """
    if low.count("```", 0, pos) % 2:
        return True
    line_start = low.rfind("\n", 0, pos) + 1
    if low.count("`", line_start, pos) % 2:
        return True
    for q in ('"', "'", "“"):
        i = low.rfind(q, line_start, pos)
        if i < 0 or (q == "'" and i > 0 and low[i - 1].isalpha()):
            continue
        j = low.find("”" if q == "“" else q, pos)
        if 0 <= j - i <= _QUOTE_SPAN and "\n" not in low[i:j]:
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Text:
    """One text prepared once: lower-cased, its UTF-8 bytes, its set of words and the
    rules' punctuation leads (`_MARKS`) it holds."""

    text: str
    low: str
    raw: bytes
    words: frozenset[bytes]
    marks: frozenset[bytes]

    @classmethod
    def of(cls, text: str) -> _Text:
        """`words`: the text's tokens, or (long texts, with Hyperscan) just those of them
        the rules and hints look for: the same answer to every question asked of it."""
        low = text.lower()
        raw = low.encode("utf-8", "surrogatepass")
        if _WORD_SCANNER is not None and len(raw) >= _WORD_SCANNER_MIN:
            return cls(text, low, raw, *_WORD_SCANNER.present_with_marks(raw))
        marks = frozenset(m for m in _MARKS if m in raw)
        return cls(text, low, raw, frozenset(raw.translate(_SPLIT).split()), marks)


# `_COMPILED` positions by trigger word or punctuation lead: a text holds a handful of
# the ~80 trigger words, so only their rules are visited.
def _by_word() -> dict[bytes, tuple[int, ...]]:
    out: dict[bytes, tuple[int, ...]] = {}
    for i, c in enumerate(_COMPILED):
        key = c.word if c.word is not None else c.lead.encode()
        out[key] = (*out.get(key, ()), i)
    return out


_BY_WORD = _by_word()


def _candidates(t: _Text) -> list[int]:
    """Positions in `_COMPILED` of the rules to try, in `_COMPILED` order."""
    found: list[int] = []
    for key in t.marks:
        found.extend(_BY_WORD[key])
    for word in t.words:
        found.extend(_BY_WORD.get(word, ()))
    found.sort()
    return found


def _phrase_hits(t: _Text, weights: Mapping[str, float]) -> dict[str, float]:
    low = t.low
    hits: dict[str, float] = {}
    for i in _candidates(t):
        c = _COMPILED[i]
        rule = c.rule
        weight = weights.get(rule.id, rule.weight)
        if weight <= 0 or hits.get(rule.id, 0.0) >= weight:
            continue
        m = c.first(low)
        if m is not None:
            w = weight * (0.4 if _quoted(low, m.start()) else 1.0)
            hits[rule.id] = max(hits.get(rule.id, 0.0), w)
    if hits and any(w in low for w in _META_WORDS):
        hits = {k: v * 0.5 for k, v in hits.items()}  # text *about* injection
    return hits


# Bidi controls and zero-width characters all encode as E2 80/E2 81 (U+2000-U+207F)
# or EF BB BF (U+FEFF) in UTF-8: two cheap byte searches rule them out.
_SUSPECT_PREFIXES = (b"\xe2\x80", b"\xe2\x81", b"\xef\xbb\xbf")


def _unicode_hits(t: _Text, weights: Mapping[str, float]) -> dict[str, float]:
    text, raw = t.text, t.raw  # lower() leaves these code points alone
    if text.isascii():
        return {}
    hits: dict[str, float] = {}
    if _width(text) == 4 and _TAGS.search(text):
        hits["invisible_tag_chars"] = weights.get("invisible_tag_chars", 0.95)
    if not any(p in raw for p in _SUSPECT_PREFIXES):
        return hits
    if any(c in text for c in _BIDI):
        hits["bidi_override"] = weights.get("bidi_override", 0.8)
    if sum(text.count(c) for c in _ZERO_WIDTH) >= 3:
        hits["zero_width_run"] = weights.get("zero_width_run", 0.6)
    return hits


def _encoded_hits(t: _Text, weights: Mapping[str, float]) -> dict[str, float]:
    """base64 blobs near a decoding hint that decode to an injection phrase."""
    for hint in _B64_HINTS:
        i = t.low.find(hint) if hint.encode() in t.words else -1
        if i < 0:
            continue
        lo, hi = max(0, i - _B64_WINDOW), i + _B64_WINDOW
        for m in list(_B64.finditer(t.text, lo, hi))[:16]:
            if _decodes_to_injection(m.group(), weights):
                return {"encoded_instruction": weights.get("encoded_instruction", 0.85)}
    return {}


def _decodes_to_injection(blob: str, weights: Mapping[str, float]) -> bool:
    try:
        decoded = base64.b64decode(blob + "=" * (-len(blob) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    return decoded.isprintable() and bool(_phrase_hits(_Text.of(decoded), weights))


_NO_HITS = TextScore(0.0, ())  # immutable: one for every clean text


def score_text(text: str, weights: Mapping[str, float] | None = None) -> TextScore:
    """Score one untrusted text: noisy-OR of its rule hits (rule ids only, no text)."""
    weights = weights or {}
    t = _Text.of(text)
    hits = _phrase_hits(t, weights) | _unicode_hits(t, weights) | _encoded_hits(t, weights)
    if not hits:
        return _NO_HITS
    score = 1.0 - math.prod(1.0 - w for w in hits.values())
    return TextScore(round(score, 4), tuple(sorted(hits)))


# ---------------------------------------------------------------- request screening


@dataclass(frozen=True, slots=True)
class InjectionVerdict:
    """The highest-scoring untrusted item: its source kind and rule ids, never text."""

    score: float
    rules: tuple[str, ...] = ()
    source: Source | None = None
    blocked: bool = False
    action: Literal["block", "log", "off"] = "log"


class InjectionScreener:
    """One profile's screening settings applied to a request body."""

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        action: Literal["block", "log", "off"] = "log",
        sources: Sequence[Source] = ("tool_result", "document", "user"),
        scope: Literal["last_turn", "all"] = "last_turn",
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.threshold = threshold
        self.action = action
        self.sources = frozenset(sources)
        self.scope = scope
        self.weights = dict(weights or {})
        # Scores of long untrusted texts already seen (`score_text` is pure in the text
        # and `weights`, both fixed here): a retried or repeated request, or a turn
        # resent whole, is not scored again.
        self.scores: TextCache[TextScore] = TextCache(max_chars=4_000_000)
        # The verdict of a request with nothing found (immutable: shared by them all).
        self._clean = InjectionVerdict(0.0, action=self.action)

    def score(self, text: str) -> TextScore:
        """`score_text` with this screener's weights, remembered for long texts."""
        found = self.scores.get(text)
        if found is None:
            found = score_text(text, self.weights)
            self.scores.put(text, found)
        return found

    def items(self, body: Mapping[str, Any], api: Api) -> Iterator[tuple[Source, str]]:
        return self.items_of(model_texts(body, api, tools=False), body)

    def items_of(
        self, texts: Sequence[Text], body: Mapping[str, Any]
    ) -> Iterator[tuple[Source, str]]:
        """Untrusted texts (from `model_texts`), one per block: a tool result, search
        result, fetched page, document or user text; if scoped, those after the last
        assistant turn and the server tool results in it."""
        last = -1
        if self.scope == "last_turn":
            messages = body.get("messages") or ()
            roles = (m.get("role") if isinstance(m, dict) else None for m in messages)
            last = max((i for i, role in enumerate(roles) if role == "assistant"), default=-1)
        groups: dict[int, tuple[str, list[str]]] = {}
        for t in texts:
            if t.source in self.sources and t.turn >= last and t.text:
                groups.setdefault(t.group, (t.source, []))[1].append(t.text)
        for source, parts in groups.values():
            yield cast(Source, source), "\n".join(parts)

    def screen(self, body: Mapping[str, Any], api: Api) -> InjectionVerdict:
        return self.screen_texts(model_texts(body, api, tools=False), body)

    def screen_texts(self, texts: Sequence[Text], body: Mapping[str, Any]) -> InjectionVerdict:
        best = self._clean
        if self.action == "off":
            return best
        for source, text in self.items_of(texts, body):
            result = self.score(text)
            if result.score > best.score:
                blocked = self.action == "block" and result.score >= self.threshold
                best = InjectionVerdict(result.score, result.rules, source, blocked, self.action)
        return best
