"""Secret and PII detectors: compiled once per profile, pure, no I/O.

Speed model (CPython `re`): scanning text is ~0.3 ns/char, but every position where a
match *attempt* starts costs ~35 ns. A branch whose alternatives do not all start with
a literal character (a named group, a class, `(?i)`) loses sre's first-character
prefilter and attempts at every position (6-7 ms per 100 KB). So every family below is
one regex whose alternatives each start with a *rare* literal anchor character
(`_`, `-`, `K`, `J`, `z`, `@`, `:` ...); a lookbehind then checks the rest of the
prefix (`-(?<=sk-)` for `sk-...`). Digit-led PII uses one class-led regex. All strings
of a request are joined with NUL and scanned in one pass per family; no pattern class
contains NUL, so matches never cross strings. Validators (Luhn, mod-97, entropy, JWT
header, IP ranges) run in Python only on the rare candidates. With Hyperscan installed,
one pass over every alternative's lead (`sk-ant-`, `passw` in any case, `[?&]sig=`)
replaces the per-family anchor searches: a family is tried only where a lead occurs,
not at every `x` of "explain" (`shapescan.AnchorScanner`).

A `Finding` holds a rule id, kind and span, never the matched text.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import sys
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Generic, Literal, TypeVar

from . import shapescan
from .shapescan import AnchorScanner, Lead, ShapeScanner, literal_lead

__all__ = [
    "BUILTIN_RULES",
    "TOKEN_SPECS",
    "Detector",
    "DetectorOptions",
    "Finding",
    "Kind",
    "RegexRule",
    "RuleInfo",
    "TextCache",
    "TokenSpec",
    "WordRule",
    "shannon_entropy",
]

Kind = Literal["secret", "pii", "custom"]
_SEP = "\x00"


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """A rule's stable id, its kind and the label used by reversible masking."""

    id: str
    kind: Kind
    label: str
    description: str


@dataclass(frozen=True, slots=True)
class Finding:
    """One detection: where it is, which rule; never the value."""

    rule: str
    kind: Kind
    start: int
    end: int


def _r(rule_id: str, kind: Kind, label: str, description: str) -> RuleInfo:
    return RuleInfo(rule_id, kind, label, description)


BUILTIN_RULES: dict[str, RuleInfo] = {
    r.id: r
    for r in (
        _r("aws_access_key", "secret", "AWS_KEY", "AWS access key id (AKIA/ASIA...)"),
        _r("aws_secret_key", "secret", "AWS_SECRET", "AWS secret access key in an assignment"),
        _r("gcp_api_key", "secret", "GCP_KEY", "Google API key (AIza...)"),
        _r("gcp_private_key_id", "secret", "GCP_KEY_ID", "service-account private_key_id"),
        _r("azure_storage_key", "secret", "AZURE_KEY", "Azure AccountKey= in a connection string"),
        _r("azure_shared_access_key", "secret", "AZURE_KEY", "Azure SharedAccessKey="),
        _r("azure_sas_signature", "secret", "AZURE_SAS", "Azure SAS token sig= parameter"),
        _r("anthropic_api_key", "secret", "ANTHROPIC_KEY", "Anthropic key (sk-ant-...)"),
        _r("openai_api_key", "secret", "OPENAI_KEY", "OpenAI-style key (sk-, sk-proj-...)"),
        _r("huggingface_token", "secret", "HF_TOKEN", "Hugging Face token (hf_...)"),
        _r("stripe_key", "secret", "STRIPE_KEY", "Stripe secret/restricted/webhook key"),
        _r("github_token", "secret", "GITHUB_TOKEN", "GitHub token (ghp_, gho_, github_pat_...)"),
        _r("gitlab_token", "secret", "GITLAB_TOKEN", "GitLab token (glpat-...)"),
        _r("slack_token", "secret", "SLACK_TOKEN", "Slack token (xoxb-, xoxp-, xapp-...)"),
        _r("slack_webhook", "secret", "SLACK_WEBHOOK", "Slack incoming-webhook URL"),
        _r("npm_token", "secret", "NPM_TOKEN", "npm access token (npm_...)"),
        _r("pypi_token", "secret", "PYPI_TOKEN", "PyPI upload token (pypi-...)"),
        _r("sendgrid_api_key", "secret", "SENDGRID_KEY", "SendGrid key (SG....)"),
        _r("google_oauth_secret", "secret", "GOOGLE_SECRET", "Google OAuth client secret"),
        _r("groq_api_key", "secret", "GROQ_KEY", "Groq key (gsk_...)"),
        _r("digitalocean_token", "secret", "DO_TOKEN", "DigitalOcean token (dop_v1_...)"),
        _r("jwt", "secret", "JWT", "JSON Web Token (header.payload.signature)"),
        _r("pem_private_key", "secret", "PRIVATE_KEY", "PEM private key block"),
        _r("url_credentials", "secret", "URL_PASSWORD", "password in scheme://user:pass@host"),
        _r("bearer_token", "secret", "BEARER", "Authorization: Bearer <high-entropy token>"),
        _r("http_basic_auth", "secret", "BASIC_AUTH", "Authorization: Basic base64(user:pass)"),
        _r("password", "secret", "PASSWORD", "password=/pwd: assignment with a real value"),
        _r("generic_secret", "secret", "SECRET", "secret/token/api_key assignment, high entropy"),
        _r("email", "pii", "EMAIL", "e-mail address"),
        _r("phone", "pii", "PHONE", "phone number (E.164 and common national formats)"),
        _r("credit_card", "pii", "CARD", "payment card number (IIN + Luhn)"),
        _r("iban", "pii", "IBAN", "IBAN (length + mod-97)"),
        _r("us_ssn", "pii", "SSN", "US social security number (valid ranges only)"),
        _r("ipv4", "pii", "IP", "IPv4 address (not loopback/unspecified/doc/multicast)"),
        _r("ipv6", "pii", "IP", "IPv6 address (not loopback/unspecified/doc/link-local)"),
    )
}


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """A prefixed token: one of `prefixes`, then `body`; the whole token is the value."""

    rule: str
    prefixes: tuple[str, ...]
    body: str
    validator: Callable[[str], bool] | None = None


@dataclass(frozen=True, slots=True)
class WordRule:
    """A custom rule matching whole words or phrases from a list."""

    id: str
    words: tuple[str, ...]
    case_sensitive: bool = False


@dataclass(frozen=True, slots=True)
class RegexRule:
    """A custom rule from a regex; group `value` (if present) is the span acted on."""

    id: str
    pattern: str
    case_sensitive: bool = True


@dataclass(frozen=True, slots=True)
class DetectorOptions:
    """Profile knobs that change what counts as a finding."""

    entropy_threshold: float = 3.0
    allow_values: frozenset[str] = frozenset()
    allow_email_domains: frozenset[str] = frozenset()


# ---------------------------------------------------------------- validators


def shannon_entropy(value: str) -> float:
    """Bits per character of the value's own character distribution."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _char_classes(value: str) -> int:
    return (
        any(c.islower() for c in value)
        + any(c.isupper() for c in value)
        + any(c.isdigit() for c in value)
        + any(not c.isalnum() for c in value)
    )


def _mixed_case(value: str) -> bool:
    return any(c.islower() for c in value) and any(c.isupper() for c in value)


def _not_example(value: str) -> bool:
    return "EXAMPLE" not in value


def _high_entropy_token(value: str) -> bool:
    return shannon_entropy(value) >= 3.0 and any(c.isdigit() for c in value)


def _b64url_json(segment: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return False
    return raw[:1] == b"{" and b'"' in raw


def _jwt(value: str) -> bool:
    header = value.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    except (binascii.Error, ValueError):
        return False
    return b'"alg"' in raw or b'"typ"' in raw


TOKEN_SPECS: tuple[TokenSpec, ...] = (
    TokenSpec("aws_access_key", ("AKIA", "ASIA", "ABIA", "ACCA"), r"[A-Z2-7]{16}", _not_example),
    TokenSpec("gcp_api_key", ("AIza",), r"[0-9A-Za-z_-]{35}"),
    TokenSpec("anthropic_api_key", ("sk-ant-",), r"[a-z]{2,8}[0-9]{2}-[A-Za-z0-9_-]{32,200}"),
    TokenSpec(
        "openai_api_key",
        ("sk-proj-", "sk-svcacct-", "sk-admin-", "sk-None-"),
        r"[A-Za-z0-9_-]{20,250}",
        _high_entropy_token,
    ),
    TokenSpec("openai_api_key", ("sk-",), r"[A-Za-z0-9]{32,64}", _high_entropy_token),
    TokenSpec("huggingface_token", ("hf_",), r"[A-Za-z]{34}", _mixed_case),
    TokenSpec(
        "stripe_key",
        ("sk_live_", "rk_live_", "sk_test_", "rk_test_", "whsec_"),
        r"[A-Za-z0-9]{16,247}",
        _high_entropy_token,
    ),
    TokenSpec("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), r"[A-Za-z0-9]{36}"),
    TokenSpec("github_token", ("github_pat_",), r"[A-Za-z0-9_]{80,90}"),
    TokenSpec("gitlab_token", ("glpat-", "glrt-", "gldt-"), r"[A-Za-z0-9_-]{20,64}"),
    TokenSpec(
        "slack_token",
        ("xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-", "xoxe-", "xapp-"),
        r"[A-Za-z0-9-]{10,250}",
        _high_entropy_token,
    ),
    TokenSpec(
        "slack_webhook",
        ("https://hooks.slack.com/services/",),
        r"T[A-Z0-9]{6,12}/B[A-Z0-9]{6,12}/[A-Za-z0-9]{20,32}",
    ),
    TokenSpec("npm_token", ("npm_",), r"[A-Za-z0-9]{36}"),
    TokenSpec("pypi_token", ("pypi-AgEIcHlwaS5vcmc",), r"[A-Za-z0-9_-]{50,300}"),
    TokenSpec("sendgrid_api_key", ("SG.",), r"[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"),
    TokenSpec("google_oauth_secret", ("GOCSPX-",), r"[A-Za-z0-9_-]{28}"),
    TokenSpec("groq_api_key", ("gsk_",), r"[A-Za-z0-9]{52}"),
    TokenSpec("digitalocean_token", ("dop_v1_", "doo_v1_", "dor_v1_"), r"[a-f0-9]{64}"),
    TokenSpec(
        "jwt",
        ("eyJ",),
        r"[A-Za-z0-9_-]{8,2000}\.eyJ[A-Za-z0-9_-]{4,8000}\.[A-Za-z0-9_-]{0,2000}",
        _jwt,
    ),
    TokenSpec(
        "pem_private_key",
        ("-----BEGIN ",),
        r"[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----[A-Za-z0-9+/=\s\\:,.-]{40,12000}?"
        r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----",
    ),
)

# Rarest first: the anchor of a prefix is its rarest character in source code and prose.
_RARITY = (
    "`~^|\\@$%!?&*JQZXKVGYBWUOFHNMPLDCIERTSA;<>{}[]jqzx_-:=/+#kv.bpgwyfmculdrhsnioate0123456789 \"'"
)
_RANK = {c: i for i, c in enumerate(_RARITY)}
_WORD = "A-Za-z0-9"


def _anchor_index(prefix: str) -> int:
    return min(range(len(prefix)), key=lambda i: (_RANK.get(prefix[i], -1), i))


# ---------------------------------------------------------------- family plumbing


# Busy anchors ('_' and '-' are ~1% of code) first need a token-ish run after them, so
# most attempts end after one cheap check instead of trying every alternative.
_GATES = {"_": "(?=[A-Za-z0-9_-]{12})", "-": "(?=[A-Za-z0-9_-]{12}|----BEGIN )"}

Handler = Callable[[re.Match[bytes], str, "Detector"], "Finding | None"]


@dataclass(slots=True)
class _Family:
    """One compiled alternation: group name -> handler."""

    pattern: re.Pattern[bytes]
    handlers: dict[str, Handler]
    anchor: bytes = b""

    def scan(
        self,
        data: bytes,
        text: str,
        det: Detector,
        out: list[Finding],
        start: int = 0,
        listed: list[int] | None = None,
    ) -> None:
        """Search `data` (the text as one byte per character); handlers read `text`.
        `listed`: the only anchor positions where a match can start (`AnchorScanner`)."""
        # A rejected candidate must not hide a match that starts inside it (a JWT in a
        # rejected `Bearer` value), so resume one character after its anchor.
        handlers = self.handlers
        find: _Leftmost | _Listed = (
            _Leftmost(self, data, start) if listed is None else _Listed(self, data, listed)
        )
        m = find.at(start)
        while m is not None:
            name = m.lastgroup
            found = handlers[name](m, text, det) if name is not None else None
            if found is not None:
                out.append(found)
                # A heuristic finding may contain a format-specific one (a JWT after
                # `Bearer`, an sk- key after `API_KEY=`): keep looking inside it.
                nxt = found.start if found.rule in _GENERIC else found.end
                m = find.at(max(m.start() + 1, nxt))
            else:
                m = find.at(m.start() + 1)


class _Leftmost:
    """The leftmost match of a family at or after a position (what `pattern.search` gives).

    Every match starts with the anchor byte, so trying `match` where `bytes.find`
    (memchr, ~0.02 ns/char) sees the anchor finds the same one; sre's own
    literal-prefix search walks ~0.45 ns/char, twenty families of them the bulk of
    a cold scan. A busy anchor (`-`, `_`, `c` in code) costs more per attempt from
    Python than sre's walk, so past a budget of attempts `search` takes over: a few
    for a short text (one `search` of 2 KB is ~1 µs, an attempt ~0.15 µs), more as
    the text grows.
    """

    __slots__ = ("budget", "data", "family")

    def __init__(self, family: _Family, data: bytes, start: int) -> None:
        self.family, self.data = family, data
        size = len(data) - start
        self.budget = min(16, size >> 9) + (size >> 11)

    def at(self, pos: int) -> re.Match[bytes] | None:
        data, family = self.data, self.family
        anchor, match = family.anchor, family.pattern.match
        while self.budget > 0:
            i = data.find(anchor, pos)
            if i < 0:
                return None
            self.budget -= 1
            m = match(data, i)
            if m is not None:
                return m
            pos = i + 1
        return family.pattern.search(data, pos)


class _Listed:
    """The leftmost match at or after a position, tried only where a lead was seen.

    `positions` (ascending) holds every anchor position where one of the family's
    alternatives can match, so trying `match` at those at or after `pos` finds what
    `pattern.search` would. Positions asked for only grow (each call resumes after the
    match it last returned).
    """

    __slots__ = ("data", "match", "next", "positions")

    def __init__(self, family: _Family, data: bytes, positions: list[int]) -> None:
        self.data, self.positions, self.next = data, positions, 0
        self.match = family.pattern.match

    def at(self, pos: int) -> re.Match[bytes] | None:
        positions, data, match = self.positions, self.data, self.match
        for i in range(bisect_left(positions, pos, self.next), len(positions)):
            m = match(data, positions[i])
            if m is not None:
                self.next = i + 1
                return m
        self.next = len(positions)
        return None


@dataclass(slots=True)
class _Builder:
    """Collects `anchor -> [alternative]`, the handler for each named group and each
    alternative's lead (what must stand around its anchor)."""

    alts: dict[str, list[str]] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)
    leads: list[Lead] = field(default_factory=list)
    counter: int = 0

    def add(self, anchor: str, rest: str, handler: Handler, lead: Lead) -> str:
        name = f"g{self.counter}"
        self.counter += 1
        body = rest.replace("(?P<V>", f"(?P<{name}_v>").replace("(?P<K>", f"(?P<{name}_k>")
        self.alts.setdefault(anchor, []).append(f"(?P<{name}>{body})")
        self.handlers[name] = handler
        self.leads.append(lead)
        return name

    def build(self) -> list[_Family]:
        """One regex per anchor character.

        A lone literal first character gets sre's literal-prefix search (~0.3 ns/char);
        any set of first characters falls back to a per-character charset test (~4
        ns/char), so twenty cheap passes beat one combined pass.
        """
        return [
            _Family(
                re.compile(f"{re.escape(a)}{_GATES.get(a, '')}(?:{'|'.join(alts)})".encode()),
                {n: self.handlers[n] for n in _group_names(alts)},
                a.encode(),
            )
            for a, alts in self.alts.items()
        ]


@lru_cache(maxsize=8)  # profiles share rule sets; a compile is ~10 ms
def _anchor_scanner(leads: tuple[Lead, ...], numbers: bool) -> AnchorScanner | None:
    """The leads' scanner; with `numbers`, probing for digit-led PII candidates too."""
    if not (leads or numbers) or not shapescan.available():
        return None
    return AnchorScanner(leads, _NUMBER_PROBE if numbers else None)


def _group_names(alts: Sequence[str]) -> list[str]:
    return [m.group(1) for alt in alts for m in re.finditer(r"\(\?P<(g\d+)>", alt)]


def _token_handler(rule: str, before: int, check: Callable[[str], bool] | None) -> Handler:
    kind = BUILTIN_RULES[rule].kind

    def handle(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
        start = m.start() - before
        if start > 0 and text[start - 1].isalnum():
            return None
        value = text[start : m.end()]
        if check is not None and not check(value):
            return None
        if value in det.options.allow_values:
            return None
        return Finding(rule, kind, start, m.end())

    return handle


def _add_token(b: _Builder, spec: TokenSpec) -> None:
    for prefix in spec.prefixes:
        i = _anchor_index(prefix)
        before, anchor, after = prefix[:i], prefix[i], prefix[i + 1 :]
        look = f"(?<={re.escape(before + anchor)})" if before else ""
        rest = f"{look}{re.escape(after)}(?:{spec.body})(?![{_WORD}])"
        lead = literal_lead(prefix, len(before))
        b.add(anchor, rest, _token_handler(spec.rule, len(before), spec.validator), lead)


# ---------------------------------------------------------------- assignments


_ASSIGN_OP = (
    r"[\"']?[ \t]{0,2}(?::=|=>|[:=])[ \t]{0,2}"
    r"(?:[rbuf]?[\"'`])?(?P<V>[^\s\"'`,;<>(){}\[\]\x00]{6,300})"
)
# (anchor, lookbehind before the anchor, literal after it, keyword family)
_KEYWORDS: tuple[tuple[str, str, str, str], ...] = (
    ("w", "pass", "(?:ord|d)", "password"),
    ("w", "p", "d", "password"),
    ("c", "se", "ret", "secret"),
    ("k", "to", "en", "token"),
    ("k", "", "ey", "key"),
)
_KEY_QUALIFIER = re.compile(
    r"api|access|secret|private|account|shared|signing|encrypt|master|client|auth|app|"
    r"license|webhook|subscription|storage|service"
)
_IDENT_EXCLUDE = re.compile(
    r"hash|_?ids?$|len|count|max|min|limit|budget|usage|tokens|tokeniz|type|name|file|path|"
    r"dir$|url|uri|field|param|header|prompt|label|placeholder|policy|format|pattern|regex|"
    r"expir|ttl|timeout|rotat|version|ref$|mode|enabled|required|reset|confirm|strength|"
    r"hint|input|public|cache|page|cursor|next|prefix|suffix|env$|var$"
)
_PLACEHOLDER = re.compile(
    r"example|sample|placeholder|change_?me|your|dummy|redacted|xxxx|\*\*\*|\.\.\.|todo|"
    r"fixme|insert|replace|^none$|^null$|^nil$|^true$|^false$|undefined|^password|^secret|"
    r"^token|^pass(?:word)?$|^test|^foo|^bar|^admin$|^root$|^guest$"
)
_REFERENCE = re.compile(
    r"^(?:[$%{<@&*!]|~/|\.{0,2}/|https?:|file:)|^[A-Za-z_$][\w$]*(?:\.[\w$-]+)+$|^[A-Z][A-Z0-9_]*$"
)
_WORDLIKE = re.compile(r"^[a-z]+(?:[-_.][a-z]+)*$|^[A-Za-z]{1,24}$")
_AWS_SECRET = re.compile(r"[A-Za-z0-9/+]{40}")
_B64_KEY = re.compile(r"[A-Za-z0-9+/]{40,100}={0,2}")
_HEX40 = re.compile(r"[0-9a-f]{40}")


def _identifier(text: str, start: int) -> str:
    """The identifier (e.g. `aws_secret_access_key`) ending at `start`."""
    i = start
    lo = max(0, start - 40)
    while i > lo and (text[i - 1].isalnum() or text[i - 1] in "_.-"):
        i -= 1
    return text[i:start]


def looks_like_password(value: str) -> bool:
    """A literal password, not a reference, placeholder or plain word."""
    if len(value) < 6 or _REFERENCE.search(value) or _PLACEHOLDER.search(value.lower()):
        return False
    return _char_classes(value) >= 2 and shannon_entropy(value) >= 2.3


def looks_like_secret(value: str, threshold: float) -> bool:
    """A literal high-entropy secret, not a reference, word or placeholder."""
    if len(value) < 12 or _REFERENCE.search(value) or _WORDLIKE.match(value):
        return False
    if _PLACEHOLDER.search(value.lower()) or _char_classes(value) < 2:
        return False
    if not any(c.isdigit() for c in value) and len(value) < 24:
        return False
    return shannon_entropy(value) >= threshold


def _classify(ident: str, value: str, family: str) -> str | None:
    low = ident.lower().replace("-", "_")
    compact = low.replace("_", "")
    if "aws" in low and "secret" in low and _AWS_SECRET.fullmatch(value):
        return "aws_secret_key"
    if compact.endswith("accountkey") and _B64_KEY.fullmatch(value):
        return "azure_storage_key"
    if compact.endswith("sharedaccesskey") and _B64_KEY.fullmatch(value):
        return "azure_shared_access_key"
    if low.endswith("private_key_id") and _HEX40.fullmatch(value):
        return "gcp_private_key_id"
    if _IDENT_EXCLUDE.search(low):
        return None
    if family == "key" and not _KEY_QUALIFIER.search(low):
        return None
    return "password" if family == "password" else "generic_secret"


def _assignment_handler(family: str, before: int) -> Handler:
    def handle(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
        name = m.lastgroup
        key_end = m.end(f"{name}_k")
        ident = _identifier(text, m.start() - before) + text[m.start() - before : key_end]
        value = text[m.start(f"{name}_v") : m.end(f"{name}_v")]
        rule = _classify(ident, value, family)
        if rule is None or rule not in det.enabled or value in det.options.allow_values:
            return None
        if rule == "password" and not looks_like_password(value):
            return None
        if rule == "generic_secret" and not looks_like_secret(value, det.options.entropy_threshold):
            return None
        return Finding(rule, "secret", m.start(f"{name}_v"), m.end(f"{name}_v"))

    return handle


def _add_assignments(b: _Builder) -> None:
    for anchor, before, after, family in _KEYWORDS:
        look = f"(?<={before}{anchor})" if before else ""
        rest = f"(?i:{look}{after})(?P<K>[A-Za-z0-9_.-]{{0,30}}?){_ASSIGN_OP}"
        # The keyword in any case (`after` too, when it is a plain word).
        word = before + anchor + (after if after.isalpha() else "")
        lead = literal_lead(word, len(before), caseless=True)
        for case in (anchor, anchor.upper()):
            b.add(case, rest, _assignment_handler(family, len(before)), lead)


# ---------------------------------------------------------------- other anchored rules

_URL_CRED = (
    r"(?<=[A-Za-z0-9]:)//[^\s:/@\"'<>\x00]{0,128}:(?P<V>[^\s@/\"'<>\x00]{1,256})@(?=[A-Za-z0-9\[])"
)
_URL_PLACEHOLDER = re.compile(r"^(?:\$|\{|<|%|\*+$|x+$|\.+$)|^pass(?:word)?$|^secret$|^pwd$")


def _url_cred(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
    name = f"{m.lastgroup}_v"
    value = text[m.start(name) : m.end(name)]
    if (
        len(value) < 3
        or _URL_PLACEHOLDER.search(value.lower())
        or _PLACEHOLDER.search(value.lower())
    ):
        return None
    if value in det.options.allow_values:
        return None
    return Finding("url_credentials", "secret", m.start(name), m.end(name))


_BEARER = r"(?<![A-Za-z0-9]B)earer[ \t]{1,3}(?P<V>[A-Za-z0-9._~+/-]{16,4000}=*)(?![A-Za-z0-9])"
_BASIC = r"(?<![A-Za-z0-9]B)asic[ \t]{1,3}(?P<V>[A-Za-z0-9+/]{8,400}={0,2})(?![A-Za-z0-9+/=])"


def _bearer(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
    name = f"{m.lastgroup}_v"
    value = text[m.start(name) : m.end(name)]
    if _PLACEHOLDER.search(value.lower()) or not any(c.isdigit() for c in value):
        return None
    if shannon_entropy(value) < det.options.entropy_threshold or value in det.options.allow_values:
        return None
    return Finding("bearer_token", "secret", m.start(name), m.end(name))


def _basic(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
    name = f"{m.lastgroup}_v"
    try:
        decoded = base64.b64decode(text[m.start(name) : m.end(name)], validate=True).decode()
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user or not password or not decoded.isprintable():
        return None
    return Finding("http_basic_auth", "secret", m.start(name), m.end(name))


_EMAIL_DOMAIN = (
    r"(?P<V>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![A-Za-z0-9-])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_FILE_TLDS = frozenset(
    [
        "png",
        "jpg",
        "jpeg",
        "gif",
        "svg",
        "webp",
        "ico",
        "css",
        "js",
        "mjs",
        "ts",
        "tsx",
        "jsx",
        "json",
        "py",
        "rb",
        "go",
        "rs",
        "java",
        "md",
        "txt",
        "html",
        "yml",
        "yaml",
        "toml",
        "lock",
        "sh",
        "cfg",
        "ini",
        "xml",
    ]
)
_EXAMPLE_DOMAINS = (
    "example.com",
    "example.org",
    "example.net",
    "users.noreply.github.com",
)
_EXAMPLE_TLDS = (".example", ".test", ".invalid", ".localhost", ".local")
_NOREPLY = frozenset({"noreply", "no-reply", "donotreply", "do-not-reply", "git"})


def _email_allowed(local: str, domain: str, det: Detector) -> bool:
    low = domain.lower()
    if local.lower() in _NOREPLY or low.rsplit(".", 1)[-1] in _FILE_TLDS:
        return True
    if low.endswith(_EXAMPLE_TLDS) or low in det.options.allow_email_domains:
        return True
    return any(low == d or low.endswith("." + d) for d in _EXAMPLE_DOMAINS)


def _email(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
    at = m.start()
    i = at
    lo = max(0, at - 64)
    while i > lo and text[i - 1] in _LOCAL_CHARS:
        i -= 1
    while i < at and text[i] in ".-+":
        i += 1
    local = text[i:at]
    if not local or local.endswith("."):
        return None
    domain = text[m.start(f"{m.lastgroup}_v") : m.end(f"{m.lastgroup}_v")]
    if _email_allowed(local, domain, det):
        return None
    if f"{local}@{domain}" in det.options.allow_values:
        return None
    return Finding("email", "pii", i, m.end())


_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def _ipv6(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
    i, j = m.start(), m.start()
    while i > 0 and text[i - 1] in _IPV6_CHARS:
        i -= 1
    while j < len(text) and text[j] in _IPV6_CHARS:
        j += 1
    if (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")) or (
        j < len(text) and (text[j].isalnum() or text[j] == "_")
    ):
        return None
    candidate = text[i:j].rstrip(".")
    if candidate.count(":") < 2:
        return None
    try:
        addr = ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    if not _reportable_ip(addr) or candidate in det.options.allow_values:
        return None
    return Finding("ipv6", "pii", i, i + len(candidate))


def _reportable_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, unspecified, link-local, multicast, reserved and doc ranges are not PII."""
    if addr.is_loopback or addr.is_unspecified or addr.is_link_local or addr.is_multicast:
        return False
    if addr.is_reserved:
        return False
    docs = (
        ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "255.255.255.255/32")
        if addr.version == 4
        else ("2001:db8::/32",)
    )
    return not any(addr in ipaddress.ip_network(n) for n in docs)


# ---------------------------------------------------------------- numbers (digit-led PII)

_NUMBERS = re.compile(
    r"[0-9+(](?:"
    # IBAN: the first check digit, with two capital letters before it.
    r"(?<=[A-Z]{2}[0-9])(?<![A-Za-z0-9][A-Z]{2}[0-9])"
    r"(?P<iban>[0-9](?: ?[A-Z0-9]){11,31})(?![A-Za-z0-9])"
    # Everything else starts a digit run: reject mid-run/mid-word starts with one check,
    # then require a separator soon or a long run before trying the shapes.
    r"|(?<![A-Za-z0-9_.,+/:$#@(-][0-9+(])(?=[0-9]{0,4}[ .()-]|[0-9]{9})(?:"
    r"(?<=\+)(?P<e164>[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,6})"
    r"|(?<=\()(?P<nanp_paren>[2-9][0-9]{2}\)[ ]?[2-9][0-9]{2}[-. ][0-9]{4})"
    r"|(?<=[0-9])(?:"
    r"(?P<ssn>[0-9]{2}-[0-9]{2}-[0-9]{4})"
    r"|(?P<card>(?:[ -]?[0-9]){12,18})"
    r"|(?<=[2-9])(?P<nanp>[0-9]{2}(?P<sep>[-. ])[2-9][0-9]{2}(?P=sep)[0-9]{4})"
    r"|(?<=0)(?P<trunk>[0-9]{1,4}[ -][0-9]{3,4}[ -]?[0-9]{3,4})"
    r"|(?<=0)(?P<pairs>[1-9](?P<psep>[ .])[0-9]{2}(?:(?P=psep)[0-9]{2}){3})"
    r"|(?P<ipv4>[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})"
    r"))(?![A-Za-z0-9_]|[.,:/-][0-9])"
    r")"
)

_IBAN_LENGTHS = {
    "AD": 24,
    "AE": 23,
    "AT": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BR": 29,
    "CH": 21,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "EE": 20,
    "ES": 24,
    "FI": 18,
    "FR": 27,
    "GB": 22,
    "GR": 27,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IS": 26,
    "IT": 27,
    "KW": 30,
    "KZ": 20,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MT": 31,
    "NL": 18,
    "NO": 15,
    "PL": 28,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "SA": 24,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "TR": 26,
    "UA": 29,
}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_brand_ok(digits: str) -> bool:
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649 or p2 == 62:
        return 16 <= n <= 19
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19
    return p2 in (36, 38, 39) or (300 <= int(digits[:3]) <= 305 and n in (14, 16))


def _card_ok(raw: str) -> bool:
    digits = raw.replace(" ", "").replace("-", "")
    seps = {c for c in raw if c in " -"}
    if len(seps) > 1 or (seps and not re.fullmatch(r"\d{4}[ -].*", raw)):
        return False
    return len(set(digits)) > 1 and _card_brand_ok(digits) and luhn_ok(digits)


def iban_ok(raw: str) -> bool:
    value = raw.replace(" ", "")
    if _IBAN_LENGTHS.get(value[:2]) != len(value):
        return False
    moved = value[4:] + value[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def ssn_ok(raw: str) -> bool:
    area, group, serial = raw[:3], raw[4:6], raw[7:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return raw not in ("078-05-1120", "219-09-9999")


def _phone_digits_ok(raw: str, lo: int, hi: int) -> bool:
    digits = [c for c in raw if c.isdigit()]
    return lo <= len(digits) <= hi and len(set(digits)) > 2


# What precedes a dotted version number: "version=", "_ver: ", "v", "Version ".
_VERSION_BEFORE = re.compile(r"(?:(?<![A-Za-z])(?i:version|ver)\s*[=:]?\s*|(?<![A-Za-z0-9])[vV])\Z")


def _ipv4_ok(raw: str) -> bool:
    parts = raw.split(".")
    if any(len(p) > 1 and p[0] == "0" for p in parts) or any(int(p) > 255 for p in parts):
        return False
    return _reportable_ip(ipaddress.IPv4Address(raw))


_NUMBER_RULES: dict[str, tuple[str, Callable[[str], bool]]] = {
    "e164": ("phone", lambda raw: _phone_digits_ok(raw, 8, 15)),
    "nanp_paren": ("phone", lambda raw: _phone_digits_ok(raw, 10, 10)),
    "nanp": ("phone", lambda raw: _phone_digits_ok(raw, 10, 10)),
    "trunk": ("phone", lambda raw: _phone_digits_ok(raw, 10, 12)),
    "pairs": ("phone", lambda raw: _phone_digits_ok(raw, 10, 10)),
    "iban": ("iban", iban_ok),
    "ssn": ("us_ssn", ssn_ok),
    "card": ("credit_card", _card_ok),
    "ipv4": ("ipv4", _ipv4_ok),
}
# Offset from the group's start back to the number's first character.
_NUMBER_BACK = {
    "e164": 1,
    "nanp_paren": 1,
    "iban": 3,
    "ssn": 1,
    "card": 1,
    "nanp": 1,
    "trunk": 1,
    "pairs": 1,
    "ipv4": 1,
}


def _shape_table() -> bytes:
    """Byte map to a shape alphabet that keeps what `_NUMBERS` looks at.

    digit -> 0, A-Z -> A, a-z and _ -> a; separators that are also boundaries
    (space, ')') and the non-boundary ones ('.', '-', '(' , '+') stay apart;
    ',/:$#@' -> ','; every other character (quotes, newlines, '=', non-ASCII '?') -> '~'.
    """
    table = bytearray(b"~" * 256)
    for c in range(128):
        ch = chr(c)
        if ch.isdigit():
            table[c] = ord("0")
        elif "A" <= ch <= "Z":
            table[c] = ord("A")
        elif "a" <= ch <= "z" or ch == "_":
            table[c] = ord("a")
        elif ch in " )+(.-":
            table[c] = c
        elif ch in ",/:$#@":
            table[c] = ord(",")
    return bytes(table)


_SHAPE = _shape_table()
# After a run's first digit, a superset of every *reportable* digit-led shape (see the
# validators): SSN, card (4 digits + separator, or 13+ digits), NANP 3-3-4, trunk-0
# national, French pairs, dotted quad. Versions, decimals, dates and line numbers fail.
_GATE = (
    rb"(?=00-00-0000|000[ -]0|0{12}|00[-. ]000[-. ]0000|0{1,4}[ -]000|0[ .]00[ .]00"
    rb"|0{0,2}\.0{1,3}\.0{1,3}\.0)"
)
# Each is a literal-prefix search on the shape bytes and yields a superset of the
# positions where `_NUMBERS` can match: (pattern, offset from match start to that position).
_CANDIDATES = (
    (re.compile(rb" 0" + _GATE), 0),  # digit run after a boundary, separator soon
    (re.compile(rb"~0" + _GATE), 0),
    (re.compile(rb"\)0" + _GATE), 0),
    (re.compile(rb"\+0"), -1),  # E.164
    (re.compile(rb"\(0"), -1),  # (202) 555-0147
    (re.compile(rb"AA00"), 1),  # IBAN check digits
)


# The same candidates in one Hyperscan pass where the wheel is installed (x86-64): the
# three boundary-led patterns as one class, the gate consumed instead of looked ahead.
_HS_CANDIDATES = (
    (rb"[ ~)]0", _GATE[3:-1], 0),
    (rb"\+0", b"", -1),
    (rb"\(0", b"", -1),
    (rb"AA00", b"", 1),
)
_SHAPE_SCANNER = ShapeScanner(_HS_CANDIDATES, b" 0") if shapescan.available() else None


def _number_probe() -> bytes:
    """Where any of `_CANDIDATES` can match, on the text's own bytes: the shape's classes
    map back one to one (`0` is a digit, `A` a capital; space, `.`, `-`, `+`, `(` are
    themselves), and the boundary before a run is left out (a superset). Where it does
    not occur, `_number_starts` finds nothing, so the shape is not even made."""
    gate = re.sub(rb"0(?![^{]*})", b"[0-9]", _GATE[3:-1])  # not the 0 of `{0,2}`
    return b"[0-9](?:" + gate + rb")|\+[0-9]|\([0-9]|[A-Z]{2}[0-9]{2}"


_NUMBER_PROBE = _number_probe()
_SHAPE_SCANNER_MIN = 8192  # below, the sre passes cost the same (a streamed delta's window)


def _number_starts(data: bytes, *, accelerated: bool = True) -> list[int]:
    """Candidate start offsets for digit-led PII without an attempt at every digit.

    sre would try a match at each of the ~10% of characters that are digits in
    code (~70 ns each); on the shape bytes, literal-prefix searches visit only run
    starts. `encode('ascii', 'replace')` keeps one byte per character. With Hyperscan
    (`shapescan`) one pass finds the same starts.
    """
    shape = b"~" + data.translate(_SHAPE)
    digits = shape.count(b"0")
    if digits <= _FEW_DIGITS:
        return _few_number_starts(shape, digits)
    if accelerated and _SHAPE_SCANNER is not None and len(data) >= _SHAPE_SCANNER_MIN:
        return sorted(_SHAPE_SCANNER.starts(shape))
    starts = {m.start() + off for pattern, off in _CANDIDATES for m in pattern.finditer(shape)}
    return sorted(starts)


# Each candidate keyed by the byte just before its first digit: a match holds a '0'
# right after that byte, so trying, at each digit of a text with few of them, the
# candidates its left neighbour allows finds every match the six `finditer` passes
# would (none can overlap another of its own pattern's).
def _by_left_byte() -> dict[int, tuple[tuple[re.Pattern[bytes], int, int], ...]]:
    out: dict[int, tuple[tuple[re.Pattern[bytes], int, int], ...]] = {}
    for pattern, off in _CANDIDATES:
        literal = pattern.pattern.replace(b"\\", b"")
        z = literal.index(b"0")
        out[literal[z - 1]] = (*out.get(literal[z - 1], ()), (pattern, off, z))
    return out


_BY_LEFT_BYTE = _by_left_byte()
_FEW_DIGITS = 6  # the six passes over 2 KB cost ~5 µs


def _few_number_starts(shape: bytes, digits: int) -> list[int]:
    """`shape[0]` is `~`, never a digit, so every digit has a left neighbour."""
    starts: set[int] = set()
    q = 0
    for _ in range(digits):
        q = shape.find(b"0", q + 1)
        for pattern, off, z in _BY_LEFT_BYTE.get(shape[q - 1], ()):
            m = pattern.match(shape, q - z)
            if m is not None:
                starts.add(m.start() + off)
    return sorted(starts)


def _scan_numbers(data: bytes, text: str, det: Detector, out: list[Finding]) -> None:
    enabled = det.enabled
    end = -1
    for pos in _number_starts(data):
        m = _NUMBERS.match(text, pos) if pos >= end else None
        if m is None:
            continue
        group = next(g for g in _NUMBER_RULES if m.group(g) is not None)
        rule, check = _NUMBER_RULES[group]
        if rule not in enabled:
            continue
        start = m.start(group) - _NUMBER_BACK[group]
        raw = text[start : m.end(group)]
        if rule == "ipv4" and _VERSION_BEFORE.search(text, max(0, start - 24), start):
            continue  # cc_version=2.1.197.123, v10.0.19041.1: a version, not an address
        if check(raw) and raw not in det.options.allow_values:
            out.append(Finding(rule, "pii", start, m.end(group)))
            end = m.end(group)


# ---------------------------------------------------------------- custom rules


def _compile_custom(
    words: Sequence[WordRule], regexes: Sequence[RegexRule]
) -> list[tuple[str, re.Pattern[str], bool]]:
    """(rule id, pattern, scan the lower-cased text?) for each custom rule.

    Case-insensitive word lists run case-sensitively on a lower-cased copy: `(?i)`
    alternations lose sre's first-character prefilter and are ~10x slower.
    """
    out: list[tuple[str, re.Pattern[str], bool]] = []
    for w in words:
        items = {x if w.case_sensitive else x.lower() for x in w.words if x.strip()}
        alts = (re.escape(x).replace(r"\ ", r"\s+") for x in sorted(items, key=len, reverse=True))
        out.append((w.id, re.compile(rf"(?:{'|'.join(alts)})(?!\w)"), not w.case_sensitive))
    for r in regexes:
        flags = 0 if r.case_sensitive else re.IGNORECASE
        out.append((r.id, re.compile(r.pattern, flags), False))
    return out


# ---------------------------------------------------------------- the detector

# Overlap ranking: format-specific secrets, then assignment/heuristic secrets, custom, PII.
_GENERIC = frozenset({"password", "generic_secret", "bearer_token", "url_credentials"})


def _rank(f: Finding) -> tuple[int, int, int]:
    tier = 1 if f.rule in _GENERIC else {"secret": 0, "custom": 2, "pii": 3}[f.kind]
    return (tier, f.start, f.start - f.end)


class Detector:
    """All enabled rules of one profile, compiled once; `scan` / `scan_many` are pure."""

    def __init__(
        self,
        enabled: Iterable[str],
        *,
        words: Sequence[WordRule] = (),
        regexes: Sequence[RegexRule] = (),
        options: DetectorOptions | None = None,
    ) -> None:
        self.enabled = frozenset(enabled)
        self.options = options or DetectorOptions()
        self._families, leads = self._build_anchored()
        self._numbers = bool(self.enabled & {r for r, _ in _NUMBER_RULES.values()})
        self._anchors = _anchor_scanner(tuple(leads), self._numbers)
        self._custom = _compile_custom(words, regexes)
        # Short strings too (tool schemas' names and descriptions: a third of a Claude
        # Code request's texts): looking one up is ~20x cheaper than scanning it again.
        self.cache = ScanCache(min_len=1, max_items=250_000)

    def _build_anchored(self) -> tuple[list[_Family], list[Lead]]:
        b = _Builder()
        for spec in TOKEN_SPECS:
            if spec.rule in self.enabled:
                _add_token(b, spec)
        if self.enabled & {
            "password",
            "generic_secret",
            "aws_secret_key",
            "azure_storage_key",
            "azure_shared_access_key",
            "gcp_private_key_id",
        }:
            _add_assignments(b)
        if "azure_sas_signature" in self.enabled:
            b.add(
                "=",
                r"(?<=[?&]sig=)(?P<V>[A-Za-z0-9%+/]{40,120})(?![A-Za-z0-9%+/])",
                _simple("azure_sas_signature", "?&"),
                Lead(rb"[?&]sig=", 5, 4),
            )
        if "url_credentials" in self.enabled:
            b.add(":", _URL_CRED, _url_cred, Lead(rb"[A-Za-z0-9]://", 4, 1))
        if "bearer_token" in self.enabled:
            b.add("B", _BEARER, _bearer, Lead(rb"Bearer[ \t]", 7, 0))
        if "http_basic_auth" in self.enabled:
            b.add("B", _BASIC, _basic, Lead(rb"Basic[ \t]", 6, 0))
        if "email" in self.enabled:
            b.add("@", _EMAIL_DOMAIN, _email, Lead(rb"@[A-Za-z0-9]", 2, 0))
        if "ipv6" in self.enabled:
            # After the anchor: up to four hex digits, then a colon.
            lead = Lead(rb"[0-9A-Fa-f:]:[0-9A-Fa-f:]", 3, 1)
            b.add(":", r"(?<=[0-9A-Fa-f:]:)[0-9A-Fa-f]{0,4}:", _ipv6, lead)
        return b.build(), b.leads

    def scan(self, text: str, start: int = 0, *, accelerated: bool = True) -> list[Finding]:
        """Non-overlapping findings in `text` (from `start`), ordered by position.

        With `start`, text before it is still seen by lookbehinds and boundary checks;
        families whose anchor does not occur after `start` are skipped.
        `accelerated=False`: without Hyperscan (the same findings; for tests).
        """
        found: list[Finding] = []
        # One byte per character (non-ASCII -> '?'), so offsets are the text's: sre
        # scans bytes faster than 2- or 4-byte strings.
        data = text.encode("ascii", "replace")
        numbers = self._numbers
        if self._anchors is not None and accelerated:
            numbers = self._scan_listed(data, text, found, start) and numbers
        else:
            for family in self._families:
                # Most families' anchors are absent from most texts: one memchr each.
                if data.find(family.anchor, start) >= 0:
                    family.scan(data, text, self, found, start)
        if numbers:
            _scan_numbers(data, text, self, found)
        if self._custom:
            self._scan_custom(text, found)
        return _resolve(found)

    def _scan_listed(self, data: bytes, text: str, found: list[Finding], start: int) -> bool:
        """The families tried only at the anchor positions of their leads (in family
        order, as the memchr path, so overlaps resolve the same way); whether the text
        may hold digit-led PII (`_NUMBER_PROBE`)."""
        assert self._anchors is not None
        positions, numbers = self._anchors.scan(data)
        listed: dict[int, list[int]] = {}
        for p in positions:
            if p >= start:
                listed.setdefault(data[p], []).append(p)
        if listed:
            for family in self._families:
                at = listed.get(family.anchor[0])
                if at is not None:
                    family.scan(data, text, self, found, start, at)
        return numbers

    def scan_many(self, texts: Sequence[str]) -> list[tuple[int, Finding]]:
        """Findings for many strings: (index into texts, finding in that text).

        Long strings already seen (earlier turns of the same conversation) come from the
        cache; the rest are joined by storage width and scanned in one pass per group.
        """
        out: list[tuple[int, Finding]] = []
        groups: dict[int, list[int]] = {}
        for i, cached in enumerate(self.cache.get_many(texts)):
            if cached is None:
                groups.setdefault(_width(texts[i]), []).append(i)
            elif cached:
                out.extend((i, f) for f in cached)
        for members in groups.values():
            self._scan_group(texts, members, out)
        out.sort(key=lambda item: item[0])
        return out

    def _scan_group(
        self, texts: Sequence[str], members: Sequence[int], out: list[tuple[int, Finding]]
    ) -> None:
        if len(members) == 1:  # a single new text (a new turn's prompt): no offsets to map
            i = members[0]
            alone = tuple(self.scan(texts[i]))
            self.cache.put(texts[i], alone)
            out.extend((i, f) for f in alone)
            return
        joined = _SEP.join(texts[i] for i in members)
        starts: list[int] = []
        pos = 0
        for i in members:
            starts.append(pos)
            pos += len(texts[i]) + 1
        per: dict[int, list[Finding]] = {i: [] for i in members}
        for f in self.scan(joined):
            k = bisect_right(starts, f.start) - 1
            base, i = starts[k], members[k]
            if f.end <= base + len(texts[i]):
                per[i].append(Finding(f.rule, f.kind, f.start - base, f.end - base))
        for i, found in per.items():
            self.cache.put(texts[i], tuple(found))
            out.extend((i, f) for f in found)

    def _scan_custom(self, text: str, out: list[Finding]) -> None:
        lowered: str | None = None
        for rule, pattern, lower in self._custom:
            target = text
            if lower:
                if lowered is None:
                    lowered = text.lower()
                    if len(lowered) != len(text):  # non-ASCII case folding changed offsets
                        lowered = text
                target = lowered
            for m in pattern.finditer(target):
                span = m.span("value") if "value" in pattern.groupindex else m.span()
                if span[0] > 0 and lower and target[span[0] - 1].isalnum():
                    continue
                if span[1] > span[0]:
                    out.append(Finding(rule, "custom", span[0], span[1]))


_COMPACT_HEADER = sys.getsizeof("\u00e9") - 2  # CPython: header + (len + 1) * kind


def _width(text: str) -> int:
    """Bytes per character CPython stores the string with (1, 2 or 4), cheaply.

    Joining one emoji-bearing string with ASCII ones would store (and scan) everything
    at 4 bytes per character; grouping by width keeps the ASCII bulk at 1.
    """
    if text.isascii():
        return 1
    kind = (sys.getsizeof(text) - _COMPACT_HEADER) // (len(text) + 1)
    return 1 if kind <= 1 else 2 if kind == 2 else 4


V = TypeVar("V")


class TextCache(Generic[V]):
    """What a pure function of one long string gave, least recently used evicted.

    Agents resend the whole conversation every turn; only the newest messages are new.
    Keys are the strings themselves (hash, then a memcmp on hit), so a hit is exact:
    a cache never answers for a different text. It lives on the compiled object whose
    settings produced its values (a `Detector`, an injection screener), so a new
    config gets new, empty caches. Memory is bounded by the characters of its keys.
    """

    def __init__(
        self, max_chars: int = 16_000_000, min_len: int = 512, max_items: int = 1 << 62
    ) -> None:
        self.max_chars = max_chars
        self.min_len = min_len
        self.max_items = max_items
        self._items: OrderedDict[str, V] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def chars(self) -> int:
        return self._chars

    def clear(self) -> None:
        self._items.clear()
        self._chars = 0

    def get(self, text: str) -> V | None:
        if len(text) < self.min_len:
            return None
        found = self._items.get(text)
        if found is not None:
            self._items.move_to_end(text)
        return found

    def get_many(self, texts: Sequence[str]) -> list[V | None]:
        """`get` of each text, in order, in one call (a Claude Code request has hundreds
        of strings, nearly all seen before: a call each was most of their cost)."""
        items, min_len = self._items, self.min_len
        get, touch = items.get, items.move_to_end
        found: list[V | None] = []
        for text in texts:
            value = get(text) if len(text) >= min_len else None
            if value is not None:
                touch(text)
            found.append(value)
        return found

    def put(self, text: str, value: V) -> None:
        if len(text) < self.min_len or len(text) > self.max_chars or text in self._items:
            return
        self._items[text] = value
        self._chars += len(text)
        while self._chars > self.max_chars or len(self._items) > self.max_items:
            old, _ = self._items.popitem(last=False)
            self._chars -= len(old)


# The detector's: findings of long strings already scanned.
ScanCache = TextCache[tuple[Finding, ...]]


def _simple(rule: str, check_before: str = "") -> Handler:
    kind = BUILTIN_RULES[rule].kind

    def handle(m: re.Match[bytes], text: str, det: Detector) -> Finding | None:
        name = f"{m.lastgroup}_v"
        if "?" in check_before and text[m.start() - 4] not in check_before:
            return None  # a non-ASCII character became '?' in the byte view
        return Finding(rule, kind, m.start(name), m.end(name))

    return handle


def _resolve(found: list[Finding]) -> list[Finding]:
    """Drop overlaps, keeping the better-ranked finding (see `_rank`)."""
    if len(found) < 2:
        return found
    ranked = sorted(found, key=_rank)
    starts: list[int] = []
    kept: list[Finding] = []
    for f in ranked:
        i = bisect_right(starts, f.start)
        if i and kept[i - 1].end > f.start:
            continue
        if i < len(kept) and kept[i].start < f.end:
            continue
        starts.insert(i, f.start)
        kept.insert(i, f)
    return kept
