"""The cache key, entries and hygiene (pure), and single-flight over the memory store."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.apis import Endpoint
from extproc.config import CacheConfig, CacheSettings, NormalizeRule
from extproc.policies.auth import Identity
from extproc.policies.cache import (
    KEY_VERSION,
    CacheRun,
    Entry,
    ResponseCache,
    Shape,
    cache_control,
    cache_key,
    tenant_scope,
)
from extproc.store.memory import MemoryStore

BODY: dict[str, Any] = {
    "model": "claude-opus-4-8",
    "max_tokens": 100,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "Review this diff"}],
    "metadata": {"user_id": "session-1"},
    "stream": True,
}


def key(body: dict[str, Any], headers: dict[str, str] | None = None, **kw: Any) -> str:
    return cache_key(
        "anthropic", Endpoint.MESSAGES, kw.pop("scope", "team=a"), body, headers or {}, **kw
    )


def test_noise_is_left_out() -> None:
    other = {**BODY, "metadata": {"user_id": "session-2"}, "stream": False}
    assert key(BODY) == key(other)


def test_key_order_and_whitespace_do_not_matter() -> None:
    shuffled = orjson.loads(orjson.dumps(dict(reversed(list(BODY.items())))))
    assert key(BODY) == key(shuffled)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "claude-sonnet-4-6"},
        {"max_tokens": 101},
        {"temperature": 0.5},
        {"system": "Be verbose."},
        {"tools": [{"name": "t", "input_schema": {}}]},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"metadata": {"user_id": "x", "other": 1}},
    ],
)
def test_everything_that_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    assert key(BODY) != key({**BODY, **change})


def test_scope_and_behaviour_headers_change_the_key() -> None:
    assert key(BODY, scope="team=a") != key(BODY, scope="team=b")
    assert key(BODY, {"anthropic-version": "2023-06-01"}) != key(BODY)
    assert key(BODY, {"anthropic-beta": "b, a"}) == key(BODY, {"anthropic-beta": "a,b"})
    assert key(BODY, {"x-other": "1"}) == key(BODY)


def test_openai_noise() -> None:
    body = {
        "model": "gpt-5",
        "messages": [],
        "user": "u1",
        "stream_options": {"include_usage": True},
    }
    plain = {"model": "gpt-5", "messages": []}
    assert cache_key("openai", Endpoint.CHAT_COMPLETIONS, "s", body, {}) == cache_key(
        "openai", Endpoint.CHAT_COMPLETIONS, "s", plain, {}
    )


def test_normalize_rules() -> None:
    def at(stamp: str) -> dict[str, Any]:
        return {**BODY, "messages": [{"role": "user", "content": f"run {stamp} id 123456789012"}]}

    rules = (NormalizeRule(builtin="timestamps"), NormalizeRule(pattern=r"id \d+", replace="id N"))
    assert key(at("2026-01-01T00:00:00Z")) != key(at("2026-01-02T00:00:00Z"))
    assert key(at("2026-01-01T00:00:00Z"), normalize=rules) == key(
        at("2026-01-02T00:00:00Z"), normalize=rules
    )


def test_shape_names_the_volatile_path() -> None:
    def at(stamp: str, text: str = "lint") -> dict[str, Any]:
        return {
            **BODY,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": f"{stamp} {text}"}]}
            ],
        }

    a = Shape.of("anthropic", at("2026-01-01T00:00:00Z"))
    b = Shape.of("anthropic", at("2026-01-01T00:05:00Z"))
    c = Shape.of("anthropic", at("2026-01-01T00:05:00Z", "other"))
    assert a.digest == b.digest != c.digest
    assert b.defeated_by(a.encode("k1"), "k2") == ["messages[0].content[0].text"]
    assert b.defeated_by(a.encode("k2"), "k2") == []


@given(
    st.dictionaries(
        st.text(min_size=1),
        st.recursive(
            st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(),
            lambda c: st.lists(c, max_size=3),
            max_leaves=5,
        ),
        max_size=5,
    )
)
def test_entries_round_trip(answer: dict[str, Any]) -> None:
    entry = Entry(api="anthropic", answer=answer, created_at=12.5)
    assert Entry.decode(entry.encode()) == entry


@pytest.mark.parametrize("size", [0, 10, 2_000, 70_000, 2_000_000])
def test_entries_of_every_size_round_trip_and_shrink(size: int) -> None:
    """The window is fitted to the document (up to zlib's largest); any size reads back,
    including entries written by `zlib.compress` before."""
    text = ("the quick brown fox " * (size // 20 + 1))[:size]
    entry = Entry(
        api="anthropic", answer={"content": [{"type": "text", "text": text}]}, created_at=1
    )
    raw = entry.encode()
    assert Entry.decode(raw) == entry
    assert len(raw) < 200 + size // 10
    legacy = zlib.compress(
        orjson.dumps({"v": KEY_VERSION, "api": "anthropic", "at": 1, "answer": entry.answer}), 6
    )
    assert Entry.decode(legacy) == entry


def test_corrupt_entries_are_misses() -> None:
    assert Entry.decode(b"not zlib") is None


def test_tenant_scope_and_cache_control() -> None:
    assert tenant_scope(Identity(source="key", key_id="k", team="t"), None) == "team=t"
    assert tenant_scope(Identity(source="key", key_id="k"), None) == "key=k"
    assert tenant_scope(Identity(source="anonymous"), "sk-a") != tenant_scope(
        Identity(source="anonymous"), "sk-b"
    )
    assert cache_control({"cache-control": "No-Cache"}) == (False, True)
    assert cache_control({"cache-control": "no-store, max-age=0"}) == (True, False)


def _waiting_signal() -> tuple[asyncio.Event, Callable[[float], Awaitable[None]]]:
    """An `extend` callback that tells the test a waiter has started waiting (a waiter
    asks Envoy for more time just before it waits), so no test sleeps and hopes."""
    asked = asyncio.Event()

    async def extend(seconds: float) -> None:
        asked.set()

    return asked, extend


async def _noop(seconds: float) -> None:
    return None


def test_single_flight_leader_then_waiter_hit() -> None:
    async def scenario() -> None:
        cache = ResponseCache(MemoryStore(), CacheSettings(wait_seconds=5))
        config = CacheConfig(enabled=True)

        def run(owner: str) -> CacheRun:
            return CacheRun(cache, config, "team=a", "k", owner, read=True, write=True)

        leader, waiter = run("r1"), run("r2")
        assert await leader.before_upstream(None, _noop) is None
        assert leader.leader
        asked, extend = _waiting_signal()
        waiting = asyncio.create_task(waiter.before_upstream(None, extend))
        await asyncio.wait_for(asked.wait(), 5)  # the waiter is waiting on the leader
        assert not waiting.done()
        assert await leader.after_upstream({"content": []}, "anthropic")
        entry = await waiting
        assert entry is not None
        assert entry.answer == {"content": []}
        assert waiter.result == "hit"

    asyncio.run(scenario())


def test_waiter_takes_over_when_the_leader_fails() -> None:
    async def scenario() -> None:
        cache = ResponseCache(MemoryStore(), CacheSettings(wait_seconds=5))
        config = CacheConfig(enabled=True)
        leader = CacheRun(cache, config, "s", "k", "r1", read=True, write=True)
        waiter = CacheRun(cache, config, "s", "k", "r2", read=True, write=True)
        await leader.before_upstream(None, _noop)
        asked, extend = _waiting_signal()
        waiting = asyncio.create_task(waiter.before_upstream(None, extend))
        await asyncio.wait_for(asked.wait(), 5)  # the waiter is waiting on the leader
        await leader.after_upstream(None, "anthropic")  # failed: nothing to store
        assert await waiting is None
        assert waiter.leader

    asyncio.run(scenario())


def test_unencodable_answers_are_not_stored() -> None:
    async def scenario() -> None:
        cache = ResponseCache(MemoryStore(), CacheSettings())
        run = CacheRun(cache, CacheConfig(enabled=True), "s", "k", "r", read=True, write=True)
        await run.before_upstream(None, _noop)
        assert run.leader
        assert not await run.after_upstream({"n": 2**70}, "anthropic")
        # the leader freed its lock: the next identical request leads at once
        again = CacheRun(cache, CacheConfig(enabled=True), "s", "k", "r2", read=True, write=True)
        await again.before_upstream(None, _noop)
        assert again.leader
        assert again.result == "miss"

    asyncio.run(scenario())


def test_oversized_answers_are_not_stored() -> None:
    async def scenario() -> None:
        cache = ResponseCache(MemoryStore(), CacheSettings(max_entry_bytes=1024))
        run = CacheRun(cache, CacheConfig(enabled=True), "s", "k", "r", read=True, write=True)
        await run.before_upstream(None, _noop)
        noise = orjson.dumps(list(range(5000))).decode()
        assert not await run.after_upstream({"text": noise}, "anthropic")

    asyncio.run(scenario())
