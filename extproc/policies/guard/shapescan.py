"""The guard's one-pass scans with Hyperscan, where installed: the digit-led PII
candidates of a text's shape, which injection trigger words a long text holds, and
where the detectors' anchored patterns may match.

`detectors._number_starts` looks for digit runs in the shape bytes (digits -> `0`,
boundaries -> space, `)` or `~`) with literal-prefix regexes and a lookahead gate. In
code and `Read` output every line number is such a run, so sre makes tens of
thousands of match attempts per MB (~7-10 ms for a 1 MB body, half a cold scan). One
Hyperscan database of the same patterns scans the shape at memory speed (measured ~6x
faster on 1 MB); the `hyperscan` wheel is installed on x86-64 Linux, and anywhere else
the sre passes run as before. Both give the same set of starts (tested).

Exactness: Hyperscan reports, for each end of a match, the *leftmost* start of a match
ending there. A start whose every match also ends where an earlier one does is then not
reported; that start lies inside that earlier match (after its first byte), and inside
a gate only a space can precede a digit, so each reported gated match is searched for
`" 0"` starts again with the sre gate.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

try:  # an accelerator, not a requirement: the sre passes give the same answer
    import hyperscan

    _INSTALLED = True
except ImportError:  # pragma: no cover - platforms without a wheel
    _INSTALLED = False

__all__ = [
    "AnchorScanner",
    "Lead",
    "ShapeScanner",
    "WordScanner",
    "available",
    "literal_lead",
]


def available() -> bool:
    return _INSTALLED


class ShapeScanner:
    """`(prefix, gate, offset)` patterns compiled into one database.

    `prefix` is a byte class or literal that starts a match, `gate` (or b"") the
    lookahead body that must follow it; a start is reported at match start + offset.
    The first pattern is the gated one (its prefix ends in a digit after a boundary).
    """

    def __init__(self, patterns: Sequence[tuple[bytes, bytes, int]], inside: bytes) -> None:
        if not _INSTALLED:
            raise RuntimeError("hyperscan is not installed")
        self._offsets = [offset for _, _, offset in patterns]
        self._gated = {i for i, (_, gate, _) in enumerate(patterns) if gate}
        self._inside = inside  # what a gated start looks like within another's match
        self._recheck = [
            re.compile(inside + b"(?=" + gate + b")") for _, gate, _ in patterns if gate
        ]
        expressions = [
            prefix + (b"(?:" + gate + b")" if gate else b"") for prefix, gate, _ in patterns
        ]
        self._db = _Database(expressions, hyperscan.HS_FLAG_SOM_LEFTMOST)

    def starts(self, shape: bytes) -> set[int]:
        """Every start the sre passes would find (each pattern's match start + offset)."""
        found: set[int] = set()
        spans: list[tuple[int, int]] = []
        offsets, gated = self._offsets, self._gated

        def on_match(pattern: int, start: int, end: int, flags: int, context: object) -> None:
            found.add(start + offsets[pattern])
            if pattern in gated:
                spans.append((start, end))

        self._db.scan(shape, on_match)
        for start, end in spans:
            self._hidden(shape, start, end, found)
        return found

    def _hidden(self, shape: bytes, start: int, end: int, found: set[int]) -> None:
        """Gated starts within (start, end) of a reported match, which Hyperscan's
        leftmost-start reporting may leave out."""
        at = shape.find(self._inside, start + 1, end)
        while at >= 0:
            if any(check.match(shape, at) for check in self._recheck):
                found.add(at)
            at = shape.find(self._inside, at + 1, end)


# A word's neighbours in `injection`'s token split: any ASCII byte but a letter, digit
# or `_` ends a token; bytes >= 0x80 (UTF-8 of non-ASCII letters) do not.
_NOT_TOKEN = rb"[^A-Za-z0-9_\x80-\xff]"


class WordScanner:
    """Which of a fixed set of words occur as whole tokens of UTF-8 text, in one pass.

    The same answer as `set(text.translate(to_spaces).split()) & words` without
    building a set of every word of the text (~17 ms for a 900 K-character tool
    result; one Hyperscan pass is ~1 ms). `marks`: punctuation looked for anywhere
    in the same pass (`present_with_marks`).
    """

    def __init__(self, words: Sequence[bytes], marks: Sequence[bytes] = ()) -> None:
        if not _INSTALLED:
            raise RuntimeError("hyperscan is not installed")
        self._words = list(dict.fromkeys(words))
        self._marks = list(dict.fromkeys(marks))
        expressions = [
            b"(?:^|" + _NOT_TOKEN + b")" + _literal(w) + b"(?:" + _NOT_TOKEN + b"|$)"
            for w in self._words
        ] + [_literal(m) for m in self._marks]
        self._db = _Database(expressions, hyperscan.HS_FLAG_SINGLEMATCH)

    def present(self, raw: bytes) -> frozenset[bytes]:
        return self.present_with_marks(raw)[0]

    def present_with_marks(self, raw: bytes) -> tuple[frozenset[bytes], frozenset[bytes]]:
        """(the words that occur as tokens, the marks that occur)."""
        found: list[int] = []
        self._db.scan(raw, lambda i, start, end, flags, context: found.append(i))
        n, words, marks = len(self._words), self._words, self._marks
        return (
            frozenset(words[i] for i in found if i < n),
            frozenset(marks[i - n] for i in found if i >= n),
        )


@dataclass(frozen=True, slots=True)
class Lead:
    """What must stand around a detector family's anchor byte for one of its patterns to
    match there: a fixed-length Hyperscan expression whose byte `anchor_at` is the anchor."""

    expression: bytes
    length: int
    anchor_at: int
    caseless: bool = False


class AnchorScanner:
    """Where, in one pass, any of a detector's leads occurs: the anchor positions worth a
    match attempt.

    A family's regex starts with its anchor byte, so `bytes.find` stops at every
    occurrence of it (an `x` in "explain", a `c` in "code") and sre tries each of the
    family's alternatives there. Each alternative needs more than its anchor (`xoxb-`,
    `passw` in any case, `[?&]sig=`): one Hyperscan pass over those leads finds the
    few positions where an attempt can succeed. Every lead is fixed-length, so each
    reported end gives its start exactly, and Hyperscan reports every end: no
    position where a lead occurs is left out.
    """

    def __init__(self, leads: Sequence[Lead], probe: bytes | None = None) -> None:
        """`probe`: an expression whose mere occurrence `scan` reports too."""
        if not _INSTALLED:
            raise RuntimeError("hyperscan is not installed")
        unique = list(dict.fromkeys(leads))
        # A match ending at `end` puts the anchor at `end - length + anchor_at`.
        self._shift = [lead.anchor_at - lead.length for lead in unique]
        flags = [hyperscan.HS_FLAG_CASELESS if lead.caseless else 0 for lead in unique]
        expressions = [lead.expression for lead in unique]
        self._probe = len(unique) if probe is not None else -1
        if probe is not None:
            expressions.append(probe)
            flags.append(hyperscan.HS_FLAG_SINGLEMATCH)
        self._db = _Database(expressions, flags)

    def positions(self, data: bytes) -> list[int]:
        """Every anchor position of a lead occurrence in `data`, ascending, once each."""
        return self.scan(data)[0]

    def scan(self, data: bytes) -> tuple[list[int], bool]:
        """(`positions`, whether the probe occurs)."""
        found: list[int] = []
        probed: list[int] = []
        add, shift, probe = found.append, self._shift, self._probe

        def on_match(lead: int, start: int, end: int, flags: int, context: object) -> None:
            if lead == probe:
                probed.append(end)
            else:
                add(end + shift[lead])

        self._db.scan(data, on_match)
        if len(found) > 1:
            found = sorted(set(found))
        return found, bool(probed)


def literal_lead(text: str, anchor_at: int, *, caseless: bool = False) -> Lead:
    """A lead that is a literal string."""
    return Lead(_literal(text.encode()), len(text), anchor_at, caseless)


class _Database:
    """A block-mode database of `expressions` (ids are their indexes), each with `flag`
    (or its own flags), and its scratch space, one per thread (a scan needs its own)."""

    def __init__(self, expressions: Sequence[bytes], flag: int | Sequence[int]) -> None:
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        flags = [flag] * len(expressions) if isinstance(flag, int) else list(flag)
        self._db.compile(
            expressions=list(expressions),
            ids=list(range(len(expressions))),
            elements=len(expressions),
            flags=flags,
        )
        self._local = threading.local()

    def scan(self, data: bytes, on_match: Callable[[int, int, int, int, object], None]) -> None:
        scratch: hyperscan.Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        self._db.scan(data, match_event_handler=on_match, scratch=scratch)


def _literal(word: bytes) -> bytes:
    return b"".join(b"\\x%02x" % byte for byte in word)
