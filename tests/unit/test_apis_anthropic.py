"""The Anthropic Messages shape (extproc.apis.anthropic): errors, usage, stream folding."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis.anthropic import (
    StreamAccumulator,
    error_body,
    error_type_for_status,
    unfold_message,
    usage_from_message,
)
from extproc.apis.sse import SseEvent, SseParser
from extproc.apis.usage import Usage
from tests.unit.api_fixtures import feed_chunked, fixture_bytes, fixture_json


def accumulate(raw: bytes, cuts: list[int] | None = None) -> StreamAccumulator:
    """Parse `raw` as SSE, split at `cuts`, and feed every event to an accumulator."""
    return feed_chunked(raw, cuts, StreamAccumulator())


def event(data: Any, name: str | None = None) -> SseEvent:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return SseEvent(name or (data.get("type") if isinstance(data, dict) else None), payload)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (409, "conflict_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
        (200, "api_error"),
    ],
)
def test_error_type_for_status(status: int, error_type: str) -> None:
    assert error_type_for_status(status) == error_type


def test_error_body_shape() -> None:
    body = orjson.loads(error_body(429, 'budget "team-a" exhausted'))
    assert body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": 'budget "team-a" exhausted'},
    }


def test_error_body_explicit_type() -> None:
    body = orjson.loads(error_body(400, "too big", "request_too_large"))
    assert body["error"]["type"] == "request_too_large"


def test_sdk_maps_error_body_to_its_exception() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(429, content=error_body(429, "slow down"))

    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk_client(handler).messages.create(**REQUEST)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


# --- usage --------------------------------------------------------------------------------


def test_usage_from_recorded_message() -> None:
    usage = usage_from_message(fixture_json("anthropic_message.json"))
    assert usage == Usage(
        input_tokens=2095,
        output_tokens=503,
        cache_creation_input_tokens=2051,
        cache_read_input_tokens=0,
    )
    assert usage.total_tokens == 2095 + 503 + 2051


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({}, Usage()),
        ({"usage": None}, Usage()),
        ({"usage": "junk"}, Usage()),
        ({"usage": {"input_tokens": 5}}, Usage(input_tokens=5)),
        (
            {"usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": None}},
            Usage(input_tokens=5, output_tokens=7),
        ),
        (
            {
                "usage": {
                    "input_tokens": -3,
                    "output_tokens": "9",
                    "cache_creation_input_tokens": True,
                }
            },
            Usage(),
        ),
        ({"usage": {"input_tokens": 4.0}}, Usage(input_tokens=4)),
    ],
)
def test_usage_tolerates_missing_and_bad_fields(message: dict[str, Any], expected: Usage) -> None:
    assert usage_from_message(message) == expected


def test_usage_addition() -> None:
    total = Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40)
    assert total == Usage(11, 22, 33, 44)
    assert total.total_tokens == 110


# --- stream folding -----------------------------------------------------------------------


def test_fold_recorded_tool_use_stream() -> None:
    acc = accumulate(fixture_bytes("anthropic_stream_tool_use.sse"))
    assert acc.complete
    assert acc.error is None
    assert acc.malformed_events == 0
    assert acc.first_content_seen
    assert acc.model == "claude-sonnet-4-5-20250929"
    assert acc.usage == Usage(472, 89, 0, 2048)
    assert acc.folded_message() == fixture_json("anthropic_stream_tool_use.folded.json")


@given(st.lists(st.integers(0, 100_000), max_size=30))
def test_fold_is_independent_of_chunking(cuts: list[int]) -> None:
    raw = fixture_bytes("anthropic_stream_tool_use.sse")
    crlf = raw.replace(b"\n", b"\r\n")
    expected = fixture_json("anthropic_stream_tool_use.folded.json")
    assert accumulate(raw, cuts).folded_message() == expected
    assert accumulate(crlf, cuts).folded_message() == expected


def test_stream_error_event_is_recorded_and_fold_refused() -> None:
    acc = accumulate(fixture_bytes("anthropic_stream_overloaded.sse"))
    assert acc.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not acc.complete
    assert acc.usage == Usage(input_tokens=25, output_tokens=1, cache_creation_input_tokens=1200)
    with pytest.raises(ValueError, match="not completed"):
        acc.folded_message()


def test_first_content_seen_only_after_a_content_block() -> None:
    acc = StreamAccumulator()
    for line in fixture_bytes("anthropic_stream_tool_use.sse").split(b"\n\n")[:2]:
        for ev in SseParser().feed(line + b"\n\n"):
            acc.feed(ev)
    assert acc.model is not None
    assert not acc.first_content_seen
    acc.feed(event({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}))
    assert acc.first_content_seen


MESSAGE_START: dict[str, Any] = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 6,
            "output_tokens": 1,
        },
    },
}


@pytest.mark.parametrize(
    ("delta_usage", "expected"),
    [
        ({"output_tokens": 50}, Usage(10, 50, 5, 6)),
        ({"output_tokens": 50, "input_tokens": 12}, Usage(12, 50, 5, 6)),
        ({"output_tokens": 50, "cache_read_input_tokens": None}, Usage(10, 50, 5, 6)),
        (
            {"output_tokens": 50, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 9},
            Usage(10, 50, 0, 9),
        ),
    ],
)
def test_message_delta_usage_is_cumulative(delta_usage: dict[str, Any], expected: Usage) -> None:
    acc = StreamAccumulator()
    acc.feed(event(MESSAGE_START))
    acc.feed(
        event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage})
    )
    assert acc.usage == expected
    acc.feed(event({"type": "message_delta", "delta": {}, "usage": delta_usage}))
    assert acc.usage == expected  # replaces, never adds


@pytest.mark.parametrize(
    ("delta_fields", "container"),
    [
        ({"stop_reason": "end_turn"}, {"id": "c1"}),
        ({"stop_reason": "end_turn", "container": None}, {"id": "c1"}),
        ({"stop_reason": "end_turn", "container": {"id": "c2"}}, {"id": "c2"}),
    ],
)
def test_message_delta_fields_overwrite_but_null_container_does_not(
    delta_fields: dict[str, Any], container: dict[str, str]
) -> None:
    acc = StreamAccumulator()
    acc.feed(
        event({**MESSAGE_START, "message": {**MESSAGE_START["message"], "container": {"id": "c1"}}})
    )
    acc.feed(event({"type": "message_delta", "delta": delta_fields, "usage": {"output_tokens": 2}}))
    acc.feed(event({"type": "message_stop"}))
    folded = acc.folded_message()
    assert folded["container"] == container
    assert folded["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    "bad",
    [
        SseEvent("content_block_delta", "{not json"),
        SseEvent("content_block_delta", ""),
        SseEvent("content_block_delta", "[1, 2]"),
        SseEvent("content_block_delta", '{"type":"content_block_delta","index":7,"delta":{}}'),
        SseEvent("content_block_delta", '{"type":"content_block_delta","index":0}'),
        SseEvent(
            "content_block_delta",
            '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}',
        ),
        SseEvent("message_start", '{"type":"message_start"}'),
        SseEvent("content_block_start", '{"type":"content_block_start","index":"x"}'),
    ],
)
def test_malformed_events_are_counted_not_raised(bad: SseEvent) -> None:
    acc = StreamAccumulator()
    acc.feed(event(MESSAGE_START))
    acc.feed(
        event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
    )
    acc.feed(bad)
    for payload in (
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 3},
        },
        {"type": "message_stop"},
    ):
        acc.feed(event(payload))
    assert acc.malformed_events == 1
    assert acc.complete
    assert acc.folded_message()["content"] == [{"type": "text", "text": "ok"}]


def test_truncated_tool_input_is_counted_and_input_kept_empty() -> None:
    acc = StreamAccumulator()
    acc.feed(event(MESSAGE_START))
    block = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
    acc.feed(event({"type": "content_block_start", "index": 0, "content_block": block}))
    delta = {"type": "input_json_delta", "partial_json": '{"a": '}
    acc.feed(event({"type": "content_block_delta", "index": 0, "delta": delta}))
    acc.feed(event({"type": "content_block_stop", "index": 0}))
    acc.feed(event({"type": "message_stop"}))
    assert acc.malformed_events == 1
    assert acc.folded_message()["content"] == [block]


def test_unknown_events_and_deltas_are_ignored() -> None:
    acc = StreamAccumulator()
    acc.feed(event(MESSAGE_START))
    acc.feed(event({"type": "some_future_event", "x": 1}))
    acc.feed(
        event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
    )
    acc.feed(event({"type": "content_block_delta", "index": 0, "delta": {"type": "future_delta"}}))
    acc.feed(SseEvent("ping", "not even json"))
    assert acc.malformed_events == 0


def test_citations_delta_accumulates() -> None:
    citation = {"type": "char_location", "cited_text": "x", "document_index": 0}
    message = {
        **MESSAGE_START["message"],
        "content": [{"type": "text", "text": "a", "citations": [citation, citation]}],
    }
    acc = accumulate(unfold_message(message))
    assert acc.folded_message()["content"] == message["content"]


# --- unfold -------------------------------------------------------------------------------

_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
_ids = st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=12)
_citation = st.fixed_dictionaries(
    {"type": st.just("char_location"), "cited_text": st.text(), "document_index": st.integers(0, 9)}
)
_text_block = st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})
_thinking_block = st.fixed_dictionaries(
    {"type": st.just("thinking"), "thinking": st.text(), "signature": st.text()}
)
_redacted_block = st.fixed_dictionaries({"type": st.just("redacted_thinking"), "data": st.text()})
_tool_use_block = st.fixed_dictionaries(
    {"type": st.just("tool_use"), "id": _ids, "name": _ids, "input": json_objects}
)
# Every block type the SDK models, with fields it accepts.
sdk_content_blocks = _text_block | _thinking_block | _redacted_block | _tool_use_block
# Plus shapes the SDK would not validate: the accumulator must fold them anyway.
content_blocks = st.one_of(
    sdk_content_blocks,
    st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text()},
        optional={"citations": st.none() | st.lists(_citation, max_size=2)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("server_tool_use"), "id": _ids, "name": _ids, "input": json_objects}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("web_search_tool_result"),
            "tool_use_id": _ids,
            "content": st.lists(json_objects, max_size=2),
        }
    ),
)
_count = st.integers(0, 10**7)


def message_strategy(
    blocks: st.SearchStrategy[dict[str, Any]],
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "id": _ids,
            "type": st.just("message"),
            "role": st.just("assistant"),
            "model": _ids,
            "content": st.lists(blocks, max_size=4),
            "stop_reason": st.sampled_from(
                ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"]
            ),
            "stop_sequence": st.none() | st.text(max_size=5),
            "usage": st.fixed_dictionaries(
                {"input_tokens": _count, "output_tokens": _count},
                optional={
                    "cache_creation_input_tokens": st.none() | _count,
                    "cache_read_input_tokens": st.none() | _count,
                    "service_tier": st.sampled_from(["standard", "priority", "batch"]),
                },
            ),
        },
        optional={"container": st.none() | json_objects},
    )


messages = message_strategy(content_blocks)
sdk_messages = message_strategy(sdk_content_blocks)


@given(messages, st.lists(st.integers(0, 100_000), max_size=8))
def test_fold_of_unfold_is_identity(message: dict[str, Any], cuts: list[int]) -> None:
    acc = accumulate(unfold_message(message), cuts)
    assert acc.malformed_events == 0
    assert acc.complete
    assert acc.folded_message() == message
    assert acc.usage == usage_from_message(message)


def test_unfold_emits_the_documented_event_sequence() -> None:
    message = fixture_json("anthropic_stream_tool_use.folded.json")
    events = SseParser().feed(unfold_message(message))
    names = [e.event for e in events]
    assert names == [
        "message_start",
        *[
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
        ],
        *["content_block_start", "content_block_delta", "content_block_stop"],
        *["content_block_start", "content_block_delta", "content_block_stop"],
        "message_delta",
        "message_stop",
    ]
    assert all(orjson.loads(e.data)["type"] == e.event for e in events)


# --- the official SDK reads what we write, and folds what we fold -------------------------

REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}


def sdk_client(handler: Any) -> anthropic.Anthropic:
    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        api_key="x",
        base_url="http://test",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def sse_handler(raw: bytes) -> Any:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)

    return handler


def without_nulls(value: Any) -> Any:
    """Drop null-valued keys: the SDK's models spell out optional fields as None."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


SDK_MESSAGES: list[dict[str, Any]] = [
    fixture_json("anthropic_stream_tool_use.folded.json"),
    fixture_json("anthropic_message.json"),
    {
        **fixture_json("anthropic_message.json"),
        "content": [
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
            {"type": "text", "text": "multi\nline\r\ntext: with 'quotes' and \"escapes\" 🎉"},
            {
                "type": "server_tool_use",
                "id": "srvtoolu_1",
                "name": "web_search",
                "input": {"query": "x"},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "noargs", "input": {}},
        ],
        "stop_reason": "max_tokens",
    },
]


@pytest.mark.parametrize("message", SDK_MESSAGES)
def test_sdk_stream_helper_rebuilds_the_unfolded_message(message: dict[str, Any]) -> None:
    raw = unfold_message(message)
    with sdk_client(sse_handler(raw)).messages.stream(**REQUEST) as stream:
        final = stream.get_final_message()
    assert without_nulls(final.to_dict()) == without_nulls(message)
    assert accumulate(raw).folded_message() == message


@pytest.mark.parametrize("message", SDK_MESSAGES)
def test_sdk_raw_stream_parses_every_unfolded_event(message: dict[str, Any]) -> None:
    raw = unfold_message(message)
    events = list(sdk_client(sse_handler(raw)).messages.create(**REQUEST, stream=True))
    assert [e.type for e in events] == [e.event for e in SseParser().feed(raw)]


def test_sdk_and_accumulator_agree_on_a_recorded_stream() -> None:
    raw = fixture_bytes("anthropic_stream_tool_use.sse")
    with sdk_client(sse_handler(raw)).messages.stream(**REQUEST) as stream:
        final = stream.get_final_message()
    assert without_nulls(final.to_dict()) == without_nulls(accumulate(raw).folded_message())


@settings(max_examples=20, deadline=None)
@given(sdk_messages)
def test_sdk_rebuilds_generated_messages(message: dict[str, Any]) -> None:
    with sdk_client(sse_handler(unfold_message(message))).messages.stream(**REQUEST) as stream:
        final = stream.get_final_message()
    assert without_nulls(final.to_dict()) == without_nulls(message)
