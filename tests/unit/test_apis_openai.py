"""The OpenAI Chat Completions shape (extproc.apis.openai): errors, usage, stream folding."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis.openai import (
    StreamAccumulator,
    error_body,
    error_type_for_status,
    unfold_completion,
    usage_from_completion,
)
from extproc.apis.sse import SseEvent, SseParser
from extproc.apis.usage import Usage
from tests.unit.api_fixtures import feed_chunked, fixture_bytes, fixture_json


def accumulate(raw: bytes, cuts: list[int] | None = None) -> StreamAccumulator:
    """Parse `raw` as SSE, split at `cuts`, and feed every event to an accumulator."""
    return feed_chunked(raw, cuts, StreamAccumulator())


def chunk_event(choices: list[dict[str, Any]], **extra: Any) -> SseEvent:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": choices,
        **extra,
    }
    return SseEvent(None, orjson.dumps(chunk).decode())


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish_reason}


DONE = SseEvent(None, "[DONE]")

# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "service_unavailable_error"),
        (504, "server_error"),
    ],
)
def test_error_type_for_status(status: int, error_type: str) -> None:
    assert error_type_for_status(status) == error_type


def test_error_body_shape() -> None:
    body = orjson.loads(error_body(401, "unknown gateway key", code="invalid_api_key"))
    assert body == {
        "error": {
            "message": "unknown gateway key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_error_body_explicit_type() -> None:
    body = orjson.loads(error_body(429, "budget spent", "insufficient_quota", "insufficient_quota"))
    assert body["error"]["type"] == "insufficient_quota"
    assert body["error"]["code"] == "insufficient_quota"


def test_sdk_maps_error_body_to_its_exception() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(403, content=error_body(403, "model not allowed", code="forbidden"))

    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk_client(handler).chat.completions.create(**REQUEST)
    assert caught.value.code == "forbidden"
    assert caught.value.type == "permission_error"


# --- usage --------------------------------------------------------------------------------


def test_usage_from_recorded_completion_splits_out_cached_tokens() -> None:
    usage = usage_from_completion(fixture_json("openai_chat_completion.json"))
    assert usage == Usage(input_tokens=2006 - 1920, output_tokens=10, cache_read_input_tokens=1920)
    assert usage.total_tokens == 2016


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, Usage()),
        ({"usage": None}, Usage()),
        ({"usage": {"prompt_tokens": 9, "completion_tokens": 2}}, Usage(9, 2)),
        (
            {"usage": {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": None}},
            Usage(9, 2),
        ),
        (
            {"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": None}}},
            Usage(9),
        ),
        (
            {"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}}},
            Usage(0, 0, 0, 10),
        ),
        (
            {
                "usage": {
                    "prompt_tokens": 100,
                    "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30},
                }
            },
            Usage(10, 0, 30, 60),
        ),
        ({"usage": {"prompt_tokens": "9", "completion_tokens": -1}}, Usage()),
    ],
)
def test_usage_tolerates_missing_and_bad_fields(body: dict[str, Any], expected: Usage) -> None:
    assert usage_from_completion(body) == expected


# --- stream folding -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai_stream_text", "openai_stream_tools"])
def test_fold_recorded_streams(name: str) -> None:
    acc = accumulate(fixture_bytes(f"{name}.sse"))
    assert acc.complete
    assert acc.error is None
    assert acc.malformed_events == 0
    assert acc.first_content_seen
    assert acc.model == "gpt-4o-2024-08-06"
    assert acc.folded_message() == fixture_json(f"{name}.folded.json")


def test_recorded_stream_usage() -> None:
    acc = accumulate(fixture_bytes("openai_stream_text.sse"))
    assert acc.usage == Usage(input_tokens=93, output_tokens=46, cache_read_input_tokens=1024)


@given(st.lists(st.integers(0, 100_000), max_size=30))
def test_fold_is_independent_of_chunking(cuts: list[int]) -> None:
    raw = fixture_bytes("openai_stream_tools.sse")
    expected = fixture_json("openai_stream_tools.folded.json")
    assert accumulate(raw, cuts).folded_message() == expected
    assert accumulate(raw.replace(b"\n", b"\r\n"), cuts).folded_message() == expected


def test_stream_without_usage_chunk_has_zero_usage_and_null_in_fold() -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(role="assistant", content="hi")]))
    acc.feed(chunk_event([delta(finish_reason="stop")]))
    acc.feed(DONE)
    assert acc.usage == Usage()
    assert acc.folded_message()["usage"] is None


def test_fold_refused_before_done() -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(role="assistant", content="hi")]))
    assert not acc.complete
    with pytest.raises(ValueError, match="not completed"):
        acc.folded_message()


def test_error_chunk_is_recorded() -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(role="assistant", content="par")]))
    error = {
        "message": "The server had an error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    acc.feed(SseEvent(None, orjson.dumps({"error": error}).decode()))
    assert acc.error == error
    assert not acc.complete


def test_first_content_seen_ignores_role_only_and_empty_chunks() -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(role="assistant", content="", refusal=None)]))
    assert not acc.first_content_seen
    acc.feed(chunk_event([delta(content="Hi")]))
    assert acc.first_content_seen


def test_first_content_seen_on_tool_call() -> None:
    acc = StreamAccumulator()
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
    acc.feed(chunk_event([delta(role="assistant", content=None, tool_calls=[call])]))
    assert acc.first_content_seen


def test_multiple_choices_interleaved() -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(0, role="assistant", content="A"), delta(1, role="assistant")]))
    acc.feed(chunk_event([delta(1, content="B"), delta(0, content="a")]))
    acc.feed(chunk_event([delta(1, "length"), delta(0, "stop")]))
    acc.feed(DONE)
    choices = acc.folded_message()["choices"]
    assert [c["message"].get("content") for c in choices] == ["Aa", "B"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]


def test_non_standard_reasoning_content_is_concatenated() -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(role="assistant", reasoning_content="thi")]))
    assert acc.first_content_seen
    acc.feed(chunk_event([delta(reasoning_content="nk", content="x")]))
    acc.feed(chunk_event([delta(finish_reason="stop")]))
    acc.feed(DONE)
    message = acc.folded_message()["choices"][0]["message"]
    assert message["reasoning_content"] == "think"
    assert message["content"] == "x"


@pytest.mark.parametrize(
    "bad",
    [
        SseEvent(None, "{not json"),
        SseEvent(None, ""),
        SseEvent(None, "[1, 2]"),
        SseEvent(None, '{"choices": [{"index": "x", "delta": {}}]}'),
        SseEvent(None, '{"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {}}]}}]}'),
        SseEvent(None, '{"choices": 5}'),
    ],
)
def test_malformed_events_are_counted_not_raised(bad: SseEvent) -> None:
    acc = StreamAccumulator()
    acc.feed(chunk_event([delta(role="assistant", content="o")]))
    acc.feed(bad)
    acc.feed(chunk_event([delta(content="k", finish_reason="stop")]))
    acc.feed(DONE)
    assert acc.malformed_events == 1
    assert acc.folded_message()["choices"][0]["message"]["content"] == "ok"


# --- unfold -------------------------------------------------------------------------------

_ids = st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=12)
_count = st.integers(0, 10**7)
_tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": _ids,
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": _ids, "arguments": st.text()}),
        }
    ),
    min_size=1,
    max_size=3,
)
_logprob = st.fixed_dictionaries(
    {
        "token": st.text(max_size=4),
        "logprob": st.floats(-100, 0),
        "bytes": st.none() | st.lists(st.integers(0, 255), max_size=4),
        "top_logprobs": st.just([]),
    }
)
_messages = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.none() | st.text()},
    optional={
        "refusal": st.none() | st.text(),
        "tool_calls": _tool_calls,
        "annotations": st.just([]),
    },
)
_usage = st.fixed_dictionaries(
    {"prompt_tokens": _count, "completion_tokens": _count, "total_tokens": _count},
    optional={
        "prompt_tokens_details": st.fixed_dictionaries(
            {"cached_tokens": _count, "audio_tokens": st.just(0)}
        ),
        "completion_tokens_details": st.fixed_dictionaries({"reasoning_tokens": _count}),
    },
)


_ALL_FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")
# The SDK's stream helper raises on length / content_filter by design.
_SDK_FINISH_REASONS = ("stop", "tool_calls")


@st.composite
def completions(
    draw: st.DrawFn, finish_reasons: tuple[str, ...] = _ALL_FINISH_REASONS
) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    choices = [
        {
            "index": i,
            "message": draw(_messages),
            "logprobs": draw(
                st.none()
                | st.fixed_dictionaries(
                    {"content": st.lists(_logprob, max_size=3), "refusal": st.none()}
                )
            ),
            "finish_reason": draw(st.sampled_from(finish_reasons)),
        }
        for i in range(n)
    ]
    body = {
        "id": draw(_ids),
        "object": "chat.completion",
        "created": draw(st.integers(0, 2**31)),
        "model": draw(_ids),
        "choices": choices,
        "usage": draw(st.none() | _usage),
    }
    optional = st.fixed_dictionaries(
        {},
        optional={
            "system_fingerprint": st.none() | _ids,
            "service_tier": st.sampled_from(["default", "flex", "priority"]),
        },
    )
    return {**body, **draw(optional)}


@given(completions(), st.lists(st.integers(0, 100_000), max_size=8))
def test_fold_of_unfold_is_identity(body: dict[str, Any], cuts: list[int]) -> None:
    acc = accumulate(unfold_completion(body), cuts)
    assert acc.malformed_events == 0
    assert acc.complete
    assert acc.folded_message() == body
    assert acc.usage == usage_from_completion(body)


def test_unfold_ends_with_usage_chunk_then_done() -> None:
    body = fixture_json("openai_chat_completion.json")
    events = SseParser().feed(unfold_completion(body))
    assert events[-1] == SseEvent(None, "[DONE]")
    last = orjson.loads(events[-2].data)
    assert last["choices"] == []
    assert last["usage"] == body["usage"]
    assert all(orjson.loads(e.data)["object"] == "chat.completion.chunk" for e in events[:-1])
    assert all(e.event is None for e in events)


# --- the official SDK reads what we write, and folds what we fold -------------------------

REQUEST: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def sdk_client(handler: Any) -> openai.OpenAI:
    transport = httpx2.MockTransport(handler)
    return openai.OpenAI(
        api_key="x",
        base_url="http://test/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def sse_handler(raw: bytes) -> Any:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)

    return handler


_SDK_ONLY = {"parsed", "parsed_arguments"}


def comparable(value: Any, parent: str = "") -> Any:
    """Drop null-valued keys and the SDK's own additions (parsed output, tool call index)."""
    if isinstance(value, dict):
        return {
            k: comparable(v, k)
            for k, v in value.items()
            if v is not None
            and k not in _SDK_ONLY
            and not (parent == "tool_calls" and k == "index")
        }
    if isinstance(value, list):
        return [comparable(v, parent) for v in value]
    return value


SDK_COMPLETIONS: list[dict[str, Any]] = [
    fixture_json("openai_chat_completion.json"),
    fixture_json("openai_stream_tools.folded.json"),
    fixture_json("openai_stream_text.folded.json"),
]


@pytest.mark.parametrize("body", SDK_COMPLETIONS)
def test_sdk_stream_helper_rebuilds_the_unfolded_completion(body: dict[str, Any]) -> None:
    raw = unfold_completion(body)
    with sdk_client(sse_handler(raw)).chat.completions.stream(**REQUEST) as stream:
        final = stream.get_final_completion()
    assert comparable(final.to_dict()) == comparable(body)
    assert accumulate(raw).folded_message() == body


@pytest.mark.parametrize("body", SDK_COMPLETIONS)
def test_sdk_raw_stream_parses_every_unfolded_chunk(body: dict[str, Any]) -> None:
    raw = unfold_completion(body)
    chunks = list(sdk_client(sse_handler(raw)).chat.completions.create(**REQUEST, stream=True))
    assert len(chunks) == len(SseParser().feed(raw)) - 1  # all but [DONE]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.to_dict() == body["usage"]


@pytest.mark.parametrize("name", ["openai_stream_text", "openai_stream_tools"])
def test_sdk_and_accumulator_agree_on_recorded_streams(name: str) -> None:
    raw = fixture_bytes(f"{name}.sse")
    with sdk_client(sse_handler(raw)).chat.completions.stream(**REQUEST) as stream:
        final = stream.get_final_completion()
    assert comparable(final.to_dict()) == comparable(accumulate(raw).folded_message())


@settings(max_examples=20, deadline=None)
@given(completions(_SDK_FINISH_REASONS))
def test_sdk_rebuilds_generated_completions(body: dict[str, Any]) -> None:
    with sdk_client(sse_handler(unfold_completion(body))).chat.completions.stream(
        **REQUEST
    ) as stream:
        final = stream.get_final_completion()
    assert comparable(final.to_dict()) == comparable(body)
