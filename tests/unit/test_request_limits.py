"""Request bodies the gateway must refuse before any policy reads them: duplicate keys,
too many JSON values."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis import Endpoint
from extproc.errors import BadRequest, PayloadTooLarge
from extproc.offload import _values, check_values, value_bound
from extproc.policies.request import parse_request
from tests.data.claude_code_request import build_request_bytes


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model": "claude-haiku-4-5", "model": "claude-opus-4-1", "messages": []}', "model"),
        (b'{"model":"m","messages":[{"role":"user","content":"sk"}],"messages":[]}', "messages"),
        # Deep inside, spaced around the colon, escaped colons elsewhere: all still found.
        (b'{"model":"m","messages":[{"role":"user","content":"a","content" :"b"}]}', "content"),
        (b'{"model":"m","metadata":{"a\\u003a":1,"x":{"y":1,"y":2}}}', "y"),
        (b'{"model":"m","tools":[{"input_schema":{"properties":{"p":{},"p":{}}}}]}', "p"),
        # A key spelled with an escape is the same key once decoded.
        (b'{"model":"m","\\u006dodel":"n"}', "model"),
    ],
)
def test_duplicate_keys_are_refused_naming_the_key(body: bytes, key: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(body, Endpoint.MESSAGES)
    assert info.value.reason == "duplicate_key"
    assert repr(key) in info.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[{"role":"user","content":"a \\": b \\u003a c"}]}',
        b'{"model" : "m", "a": {"model": 1}, "b": [{"model": 2}]}',
        b'{"model":"m","n":123456789012345678901234567890}',
    ],
)
def test_distinct_keys_pass(body: bytes) -> None:
    assert parse_request(body, Endpoint.MESSAGES).model == "m"


def test_duplicate_check_costs_tens_of_microseconds_on_a_claude_code_request() -> None:
    raw = build_request_bytes()
    parsed = orjson.loads(raw)
    from extproc.policies.request import check_unique_keys

    best = float("inf")
    for _ in range(5):  # best of 5 runs of 50: the shared machine is noisy
        start = time.perf_counter()
        for _ in range(50):
            check_unique_keys(raw, parsed)
        best = min(best, (time.perf_counter() - start) / 50)
    assert best < 1e-3, f"{best * 1e6:.0f} µs"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values, spaced=st.booleans())
def test_value_bound_is_never_below_the_real_count(value: Any, spaced: bool) -> None:
    raw = json.dumps(value, indent=1 if spaced else None).encode()
    real = sum(1 for _ in _values(orjson.loads(raw)))
    assert value_bound(raw, 0) >= real
    assert value_bound(raw, 10**9) >= real  # the length bound too
    if real > 1:
        with pytest.raises(PayloadTooLarge):
            check_values(orjson.loads(raw), real - 1)
    check_values(orjson.loads(raw), real)


def test_a_summarized_body_forwards_and_parses_as_sent() -> None:
    """The worker's summary of a heavy body (extproc/offload.py): the loop holds its big
    values serialized, yet re-serializing gives the same JSON, in the same key order, and
    `full_body` the same values; small values are parsed as usual."""
    from extproc.config import LimitsConfig
    from extproc.offload import PART_BYTES, Job, check_body

    messages = [{"role": "user", "content": "x" * (PART_BYTES + 1)}]
    body = {"model": "claude-opus-4-8", "messages": messages, "max_tokens": 9, "stop": ["a"]}
    raw = orjson.dumps(body)
    job = Job("anthropic", Endpoint.MESSAGES, True, None, False, LimitsConfig())
    checked = check_body(raw, job)
    assert checked.error is None
    assert checked.summary is not None
    request = checked.summary.parsed()
    assert isinstance(request.body["messages"], orjson.Fragment)
    assert request.body["stop"] == ["a"]
    assert request.model == "claude-opus-4-8"
    assert orjson.dumps(request.body) == raw
    assert request.full_body() == body
    assert request.key_body()["messages"] == checked.summary.digests["messages"]
