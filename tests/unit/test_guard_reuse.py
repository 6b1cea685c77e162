"""What the guard reuses from earlier turns: walked units, scan findings, injection scores.

Claude Code resends the whole conversation every turn, so the guard keeps what it learnt
about each text and unit it has seen. These tests hold the caches to their contract: a
hit gives exactly what the work would (never a result for a different text or place),
memory is bounded with the least recently used evicted, and a new config starts empty.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis import walk
from extproc.apis.walk import WalkLimits, WalkMemo, model_texts
from extproc.errors import PayloadTooLarge
from extproc.policies.cache.key import Shape, _strings
from extproc.policies.guard import Guard, GuardConfig, injection, shapescan
from extproc.policies.guard.detectors import (
    _GENERIC,
    Detector,
    Finding,
    TextCache,
    _number_starts,
)
from extproc.policies.guard.injection import _COMPILED, InjectionScreener, score_text
from extproc.policies.guard.redact import apply_plan
from tests.data.claude_code_request import build_request
from tests.data.guard_samples import NEGATIVES, POSITIVES
from tests.unit.test_request_walk import (
    ANTHROPIC,
    ANTHROPIC_TOP,
    ATTACK,
    GH,
    OPENAI,
    OPENAI_TOP,
    _plant,
)

PADDING = "harmless context line\n" * 20  # makes a unit long enough to be kept


def _anthropic_bodies() -> list[dict[str, Any]]:
    bodies = [
        {"model": "m", "messages": [{"role": role, "content": [_plant(block, GH)]}]}
        for _, role, block, _ in ANTHROPIC
    ]
    bodies += [{"model": "m", "messages": [], **_plant(f, GH)} for _, f in ANTHROPIC_TOP]
    return [*bodies, build_request()]


def _openai_bodies() -> list[dict[str, Any]]:
    bodies = [{"model": "m", "messages": [_plant(m, GH)]} for _, m, _ in OPENAI]
    return bodies + [{"model": "m", "messages": [], **_plant(f, GH)} for _, f in OPENAI_TOP]


@pytest.mark.parametrize(
    ("api", "bodies"), [("anthropic", _anthropic_bodies()), ("openai", _openai_bodies())]
)
@pytest.mark.parametrize("tools", [True, False])
def test_memo_walk_equals_the_walk_for_every_block_type(
    api: Any, bodies: list[dict[str, Any]], tools: bool
) -> None:
    memo = WalkMemo(min_bytes=0)  # every unit kept, however small
    for body in bodies:
        expected = model_texts(body, api, tools=tools)
        assert model_texts(body, api, tools=tools, memo=memo) == expected  # filling
        again = orjson.loads(orjson.dumps(body))  # the next turn: new objects
        assert model_texts(again, api, tools=tools, memo=memo) == expected  # from the memo
    assert len(memo) > 0


def test_memo_never_answers_for_other_text_or_another_place() -> None:
    memo = WalkMemo(min_bytes=0)
    block = {"type": "text", "text": PADDING + "one"}
    first = {"messages": [{"role": "user", "content": [block]}]}
    model_texts(first, "anthropic", memo=memo)
    changed = {"messages": [{"role": "user", "content": [{**block, "text": PADDING + "two"}]}]}
    assert model_texts(changed, "anthropic", memo=memo)[-1].text.endswith("two")
    # the same block a turn later, by the assistant, after another block: its own path,
    # turn, source and block number
    moved = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}, block]},
        ]
    }
    assert model_texts(moved, "anthropic", memo=memo) == model_texts(moved, "anthropic")
    # a number where a string was is not a text
    typed = {"messages": [{"role": "user", "content": [{"type": "text", "text": 1, "n": "1"}]}]}
    stringy = {"messages": [{"role": "user", "content": [{"type": "text", "text": "1", "n": 1}]}]}
    model_texts(typed, "anthropic", memo=memo)
    assert model_texts(stringy, "anthropic", memo=memo) == model_texts(stringy, "anthropic")


def test_memo_is_bounded_lru_and_skips_non_json() -> None:
    memo = WalkMemo(max_bytes=3000, min_bytes=0)
    bodies = [{"messages": [{"role": "user", "content": f"{i} " + "y" * 1000}]} for i in range(5)]
    for body in bodies:
        model_texts(body, "anthropic", memo=memo)
    assert memo.size <= 3000
    assert len(memo) < 3 + 5
    odd = {"messages": [{"role": "user", "content": [{"type": "text", "text": "t", "x": {1}}]}]}
    assert [t.text for t in model_texts(odd, "anthropic", memo=memo)] == ["t"]


def test_memo_keeps_at_most_its_units_per_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk, "MEMO_UNITS_PER_WALK", 3)
    memo = WalkMemo(min_bytes=0)
    blocks = [{"type": "text", "text": f"block {i}"} for i in range(10)]
    body = {"messages": [{"role": "user", "content": blocks}]}
    texts = model_texts(body, "anthropic", memo=memo)
    assert texts == model_texts(body, "anthropic")
    assert len(memo) == 3  # tools, output_format, system: then the blocks are walked


def test_memo_hit_still_counts_against_the_scan_cap() -> None:
    memo = WalkMemo(min_bytes=0)
    body = {"messages": [{"role": "user", "content": "x" * 100}]}
    model_texts(body, "anthropic", memo=memo)
    with pytest.raises(PayloadTooLarge):
        model_texts(body, "anthropic", limits=WalkLimits(max_chars=99), memo=memo)


def test_text_cache_is_exact_bounded_and_lru() -> None:
    cache: TextCache[int] = TextCache(max_chars=30, min_len=2, max_items=3)
    cache.put("a", 1)  # too short: not kept
    assert cache.get("a") is None
    for i, text in enumerate(["bb", "cc", "dd"]):
        cache.put(text, i)
    assert cache.get("bb") == 0  # now the most recent
    cache.put("ee", 3)  # over max_items: "cc" (least recent) goes
    assert cache.get("cc") is None
    assert cache.get("bb") == 0
    assert len(cache) == 3
    cache.put("f" * 29, 4)  # over max_chars: evicts until it fits
    assert cache.chars <= 30
    assert cache.get("f" * 29) == 4


def test_injection_scores_are_reused_only_for_the_same_text() -> None:
    screener = InjectionScreener()
    attack = PADDING * 2 + ATTACK
    benign = PADDING * 2 + "Consider all previous instructions and print the summary."
    first = screener.score(attack)
    assert first == score_text(attack)
    assert first.score > 0.8
    assert screener.score(attack) is first  # kept
    assert screener.score(benign) == score_text(benign)
    assert screener.score(benign).score < first.score
    # other weights (a config change) are another screener, starting empty
    muted = InjectionScreener(weights={rule: 0.0 for rule in first.rules})
    assert len(muted.scores) == 0
    assert muted.score(attack).score < first.score


def test_repeated_turn_gives_the_same_inspection_and_redaction() -> None:
    config = GuardConfig.model_validate({"profiles": {"default": {"masking": {"enabled": True}}}})
    policy = Guard(config).profile()
    body = build_request()
    body["messages"][-1]["content"].append(
        {"type": "text", "text": PADDING + f"mail ops@acme-corp.io, token {GH}. {ATTACK}"}
    )
    fresh = Guard(config).profile().inspect(body, "anthropic")
    for _ in range(2):  # the second from the caches
        again = policy.inspect(orjson.loads(orjson.dumps(body)), "anthropic")
        assert again == fresh
    assert len(policy.walks) > 0
    policy.forget()  # cold again: the same answer from scratch
    assert len(policy.walks) == 0
    assert len(policy.injection.scores) == 0
    assert policy.inspect(body, "anthropic") == fresh
    result = apply_plan(body, again.redaction)
    assert result.body is not None
    assert GH not in orjson.dumps(result.body).decode()
    assert again.injection.score > 0.8


def test_shape_checksums_follow_the_strings_order() -> None:
    body = build_request()
    shape = Shape.of("anthropic", body)
    expected = [zlib.crc32(text.encode()) for _, text in _strings(shape.body, ())]
    assert shape.checksums == expected


def _search_only(det: Detector, text: str) -> list[Finding]:
    """The family scan as `pattern.search` alone does it (the oracle for `_find`)."""
    data = text.encode("ascii", "replace")
    found: list[Finding] = []
    for family in det._families:
        m = family.pattern.search(data)
        while m is not None:
            name = m.lastgroup
            hit = family.handlers[name](m, text, det) if name is not None else None
            nxt = m.start() + 1
            if hit is not None:
                found.append(hit)
                nxt = max(nxt, hit.start if hit.rule in _GENERIC else hit.end)
            m = family.pattern.search(data, nxt)
    return sorted(found, key=lambda f: (f.start, f.rule))


def _family_findings(det: Detector, text: str) -> list[Finding]:
    data = text.encode("ascii", "replace")
    found: list[Finding] = []
    for family in det._families:
        family.scan(data, text, det, found)
    return sorted(found, key=lambda f: (f.start, f.rule))


def test_anchor_find_gives_what_search_gives() -> None:
    det = Guard().profile().redaction.detector
    samples = "\n".join(text for _, text, _ in POSITIVES) + "\n".join(NEGATIVES)
    fixture = "\x00".join(t.text for t in model_texts(build_request(), "anthropic"))
    busy = "x_y-z: c=w; " * 3000 + samples  # anchors past the find budget: search takes over
    for text in (samples, fixture, busy, samples * 40):
        assert _family_findings(det, text) == _search_only(det, text)
    assert _search_only(det, samples)  # the oracle does find things


def _listed_findings(det: Detector, text: str) -> list[Finding]:
    data = text.encode("ascii", "replace")
    found: list[Finding] = []
    det._scan_listed(data, text, found, 0)
    return sorted(found, key=lambda f: (f.start, f.rule))


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
def test_anchor_leads_give_what_search_gives() -> None:
    det = Guard().profile().redaction.detector
    samples = "\n".join(text for _, text, _ in POSITIVES) + "\n".join(NEGATIVES)
    fixture = "\x00".join(t.text for t in model_texts(build_request(), "anthropic"))
    cased = samples.upper() + samples.lower() + samples.swapcase()  # caseless keywords
    for text in (samples, fixture, cased, "x_y-z: c=w; " * 3000 + samples):
        assert _listed_findings(det, text) == _search_only(det, text)
        assert det.scan(text) == det.scan(text, accelerated=False)
    assert _listed_findings(det, samples)  # the oracle does find things


# Pieces of every family's leads, and what stands around them, packed together.
_LEAD_PARTS = [
    "sk-", "ant-", "api03-", "proj-", "AKIA", "ghp_", "xoxb-", "eyJ", "-----BEGIN ", "PRIVATE KEY",
    "passw", "PassWord", "pwd", "SECRET", "token", "Key", "api_key", "sig=", "?", "&", "://",
    "http", "user:", "@", "acme.io", "Bearer ", "Basic ", "fe80::", "2001:db8::1", ":", "=",
    "'", '"', " ", "\n", "_", "-", "A1b2C3d4E5f6G7h8I9j0", "K", "k", "W", "w", "c", "B", "é",
]  # fmt: skip


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
@given(st.lists(st.sampled_from(_LEAD_PARTS), max_size=60), st.integers(0, 40))
@settings(max_examples=400, deadline=None)
def test_anchor_leads_equal_memchr_scan(parts: list[str], start: int) -> None:
    det = Guard().profile().redaction.detector
    text = "".join(parts)
    assert det.scan(text, start) == det.scan(text, start, accelerated=False)
    assert _listed_findings(det, text) == _family_findings(det, text)


_SHAPES = "0123456789 .-()+~\nAB_xy:/"


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
@given(st.text(alphabet=_SHAPES, max_size=200))
@settings(max_examples=400, deadline=None)
def test_hyperscan_number_candidates_equal_sre(text: str) -> None:
    data = text.encode("ascii", "replace")
    assert _number_starts(data) == _number_starts(data, accelerated=False)


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
def test_hyperscan_number_candidates_on_real_text() -> None:
    texts = [t.text for t in model_texts(build_request(1 << 19), "anthropic")]
    texts += [text for _, text, _ in POSITIVES] + list(NEGATIVES)
    # runs hidden inside other runs: pairs, separators and digits packed together
    texts += ["0 00 00 00 00 12 34 56 78 1 2 3 4", "1-2 3 45 678 9012 3 4-5 6", " 1 1 1 1 1 1 1"]
    for text in (*texts, "\x00".join(texts)):
        data = text.encode("ascii", "replace")
        assert _number_starts(data) == _number_starts(data, accelerated=False)


def _probe_fires(data: bytes) -> bool:
    scanner = Guard().profile().redaction.detector._anchors
    assert scanner is not None
    return scanner.scan(data)[1]


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
@given(st.text(alphabet=_SHAPES + "é\t", max_size=200))
@settings(max_examples=400, deadline=None)
def test_number_probe_covers_every_candidate(text: str) -> None:
    """Where the probe does not fire, the number scan is skipped: it must have found
    nothing there."""
    data = text.encode("ascii", "replace")
    assert _probe_fires(data) or not _number_starts(data, accelerated=False)


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
def test_number_probe_on_real_text() -> None:
    texts = [t.text for t in model_texts(build_request(), "anthropic")]
    texts += [text for _, text, _ in POSITIVES] + list(NEGATIVES)
    fired = 0
    for text in texts:
        data = text.encode("ascii", "replace")
        starts = _number_starts(data, accelerated=False)
        assert _probe_fires(data) or not starts
        fired += bool(starts)
    assert fired > 20  # the samples do hold numbers
    assert not _probe_fires(b"request 12: please review v1.2 of this code, line 3")


def test_injection_lead_find_gives_what_search_gives() -> None:
    data = Path(__file__).parents[1] / "data"
    texts = [
        orjson.loads(line)["text"]
        for name in ("injection_set.jsonl", "injection_holdout.jsonl")
        for line in (data / name).read_text().splitlines()
        if line.strip()
    ]
    texts += [t.text for t in model_texts(build_request(), "anthropic")]
    # past the find budget: many leads without a match before one with
    texts.append("ignore this, " * 3000 + ATTACK)
    for text in (*texts, "\n".join(texts)):
        low = text.lower()
        for rule in _COMPILED:
            found, expected = rule.first(low), rule.pattern.search(low)
            assert (found and found.span()) == (expected and expected.span()), rule.rule.id


def _split_words(text: str) -> frozenset[bytes]:
    raw = text.lower().encode("utf-8", "surrogatepass")
    return frozenset(raw.translate(injection._SPLIT).split()) & frozenset(injection._LOOKED_FOR)


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
@given(
    st.lists(
        st.sampled_from(
            ["ignore", "previous", "system", "base64", "é", "_", " ", "\n", "-", "x", "1", "İ"]
        ),
        max_size=40,
    )
)
@settings(max_examples=300, deadline=None)
def test_word_scanner_finds_the_split_tokens(parts: list[str]) -> None:
    text = "".join(parts)
    raw = text.lower().encode("utf-8", "surrogatepass")
    assert injection._WORD_SCANNER is not None
    assert injection._WORD_SCANNER.present(raw) == _split_words(text)


@pytest.mark.skipif(not shapescan.available(), reason="hyperscan is not installed here")
def test_long_texts_score_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path(__file__).parents[1] / "data"
    lines = (data / "injection_set.jsonl").read_text().splitlines()
    texts = [orjson.loads(line)["text"] for line in lines if line.strip()]
    padding = "ordinary tool output, nothing to see\n" * 150  # over the scanner's minimum
    longs = [padding + text for text in texts]
    scores = [score_text(long) for long in longs]
    for long in longs:
        assert injection._Text.of(long).words == _split_words(long)
    big = "\n".join(t.text for t in model_texts(build_request(), "anthropic"))
    assert injection._Text.of(big).words == _split_words(big)
    monkeypatch.setattr(injection, "_WORD_SCANNER", None)  # every token, split
    assert scores == [score_text(long) for long in longs]


def test_marks_are_the_punctuation_leads_present() -> None:
    """A rule led by punctuation is tried only when its lead occurs: `first` would find
    nothing otherwise, so the marks must be exactly the leads present."""
    data = Path(__file__).parents[1] / "data"
    lines = (data / "injection_set.jsonl").read_text().splitlines()
    texts = [orjson.loads(line)["text"] for line in lines if line.strip()]
    texts += [t.text for t in model_texts(build_request(), "anthropic")]
    padding = "ordinary tool output, nothing to see\n" * 150  # over the scanner's minimum
    for text in (*texts, *(padding + t for t in texts), "<!-- a -->", "![x](y)", "[", "<"):
        raw = text.lower().encode("utf-8", "surrogatepass")
        expected = frozenset(m for m in injection._MARKS if m in raw)
        assert injection._Text.of(text).marks == expected
    assert set(injection._MARKS) == {b"<", b"[", b"\n", b"<!--", b"!["}


def test_get_many_is_get_of_each_in_order() -> None:
    """Same values and the same recency order (eviction) as a `get` per text."""
    one: TextCache[int] = TextCache(max_chars=30, min_len=2)
    many: TextCache[int] = TextCache(max_chars=30, min_len=2)
    words = ["aaaa", "bbbb", "cccc", "dddd", "x", "eeee"]
    for cache in (one, many):
        for n, word in enumerate(words):
            cache.put(word, n)
    asked = ["cccc", "zzzz", "x", "aaaa", "cccc", ""]
    assert many.get_many(asked) == [one.get(t) for t in asked] == [2, None, None, 0, 2, None]
    for cache in (one, many):
        cache.put("ffffffffffffffffffff", 9)  # evicts the least recently used
    assert list(many._items) == list(one._items) == ["aaaa", "cccc", "ffffffffffffffffffff"]
