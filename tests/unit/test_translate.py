"""Anthropic ⇄ OpenAI translators (extproc.translate): requests, answers, streams, losses."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.apis import anthropic as anthropic_api
from extproc.apis import openai as openai_api
from extproc.apis.sse import SseEvent, SseParser
from extproc.errors import BadRequest
from extproc.translate import Lossy, Notes, Untranslatable
from extproc.translate import anthropic_on_openai as a2o
from extproc.translate import openai_on_anthropic as o2a
from extproc.translate.common import anthropic_error, openai_error
from tests.data.claude_code_request import build_request
from tests.unit.api_fixtures import fixture_bytes, fixture_json

REFUSE_ALL = Lossy(default="refuse")


def events_of(raw: bytes) -> list[SseEvent]:
    parser = SseParser()
    return [*parser.feed(raw), *parser.close()]


def anthropic_sse(events: list[dict[str, Any]]) -> list[SseEvent]:
    return [SseEvent(e["type"], orjson.dumps(e).decode()) for e in events]


def openai_sse(chunks: list[Any]) -> list[SseEvent]:
    return [SseEvent(None, c if isinstance(c, str) else orjson.dumps(c).decode()) for c in chunks]


# --- Anthropic request -> OpenAI request ----------------------------------------------------


A_REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "plain text, sampling, stop, user, stream",
        {
            "model": "m",
            "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.3,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u1"},
            "stream": True,
        },
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
            "max_tokens": 100,
            "stop": ["END"],
            "temperature": 0.3,
            "top_p": 0.9,
            "user": "u1",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "system blocks joined, billing block dropped; text + image parts",
        {
            "model": "m",
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=1"},
                {"type": "text", "text": "one"},
                {"type": "text", "text": "two"},
            ],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}},
                    ],
                }
            ],
        },
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "one\n\ntwo"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                        {"type": "image_url", "image_url": {"url": "https://x/i.png"}},
                    ],
                },
            ],
        },
    ),
    (
        "tool turn: tool_use -> tool_calls, tool_result -> tool message before user text",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "t1", "name": "wx", "input": {"city": "Oslo"}},
                        {"type": "tool_use", "id": "t2", "name": "tz", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "rain"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "t2",
                            "content": [{"type": "text", "text": "CET"}],
                        },
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
            "tools": [
                {"name": "wx", "description": "weather", "input_schema": {"type": "object"}},
                {"name": "tz", "input_schema": {"type": "object", "properties": {}}},
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "checking",
                    "tool_calls": [
                        {
                            "id": "t1",
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"city":"Oslo"}'},
                        },
                        {
                            "id": "t2",
                            "type": "function",
                            "function": {"name": "tz", "arguments": "{}"},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "t1", "content": "rain"},
                {"role": "tool", "tool_call_id": "t2", "content": "CET"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "wx",
                        "description": "weather",
                        "parameters": {"type": "object"},
                    },
                },
                {
                    "type": "function",
                    "function": {"name": "tz", "parameters": {"type": "object", "properties": {}}},
                },
            ],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
    ),
    (
        "named tool choice; screenshot inside a tool result rides in the next user message",
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t9",
                            "content": [
                                {"type": "text", "text": "shot"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/jpeg",
                                        "data": "Zm8=",
                                    },
                                },
                            ],
                        }
                    ],
                }
            ],
            "tools": [{"name": "snap", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "snap"},
        },
        {
            "model": "m",
            "messages": [
                {"role": "tool", "tool_call_id": "t9", "content": "shot"},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,Zm8="}}
                    ],
                },
            ],
            "tools": [
                {"type": "function", "function": {"name": "snap", "parameters": {"type": "object"}}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "snap"}},
        },
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "expected"), A_REQUEST_CASES, ids=[c[0] for c in A_REQUEST_CASES]
)
def test_anthropic_request_to_openai(
    name: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    notes = Notes()
    assert a2o.to_openai_request(body, notes) == expected
    assert notes.dropped == {}


def test_system_messages_in_the_conversation_and_long_user_ids() -> None:
    """What Claude Code 2.x sends: a `system` message among the turns, `thinking`
    adaptive, `output_config.effort`, and `metadata.user_id` as a JSON object."""
    user_id = '{"device_id":"' + "e" * 64 + '","account_uuid":"","session_id":"cdb1"}'
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "env", "cache_control": {"type": "ephemeral"}}
                ],
            },
            {"role": "system", "content": "more"},
        ],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": []},
        "metadata": {"user_id": user_id},
    }
    notes = Notes()
    out = a2o.to_openai_request(body, notes)
    assert out["messages"][1:] == [
        {"role": "system", "content": "env"},
        {"role": "system", "content": "more"},
    ]
    assert out["user"].startswith("sha256:")
    assert len(out["user"]) <= 64
    assert out["user"] == a2o.to_openai_request(body, Notes())["user"]
    assert notes.dropped == {"cache_control": 1, "reasoning": 2, "beta": 1}


def test_max_completion_tokens_field_is_configurable() -> None:
    body = {"model": "m", "max_tokens": 5, "messages": []}
    out = a2o.to_openai_request(body, Notes(), max_tokens_field="max_completion_tokens")
    assert out["max_completion_tokens"] == 5
    assert "max_tokens" not in out


# (category, request fragment) for everything an OpenAI provider cannot take.
A_LOSSES: list[tuple[str, dict[str, Any]]] = [
    ("reasoning", {"thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ("reasoning", {"output_config": {"effort": "high"}}),
    ("response_format", {"output_config": {"format": {"type": "json_schema"}}}),
    (
        "thinking",
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"}],
                }
            ]
        },
    ),
    (
        "thinking",
        {
            "messages": [
                {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}
            ]
        },
    ),
    (
        "cache_control",
        {"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]},
    ),
    ("server_tools", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    (
        "server_tools",
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}
                    ],
                }
            ]
        },
    ),
    (
        "documents",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {
                                "type": "base64",
                                "media_type": "application/pdf",
                                "data": "JVBE",
                            },
                        }
                    ],
                }
            ]
        },
    ),
    (
        "citations",
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "t", "citations": [{"type": "char_location"}]}
                    ],
                }
            ]
        },
    ),
    ("sampling", {"top_k": 5}),
    ("beta", {"context_management": {"edits": []}}),
    (
        "beta",
        {
            "messages": [
                {"role": "user", "content": [{"type": "container_upload_x", "file_id": "f"}]}
            ]
        },
    ),
]


@pytest.mark.parametrize(("category", "fragment"), A_LOSSES)
def test_anthropic_losses_drop_with_a_note_or_refuse(
    category: str, fragment: dict[str, Any]
) -> None:
    body = {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        **fragment,
    }
    notes = Notes()
    a2o.to_openai_request(body, notes)
    assert notes.dropped.get(category, 0) >= 1, notes.dropped
    with pytest.raises(Untranslatable) as refused:
        a2o.to_openai_request(body, Notes(Lossy(fields={category: "refuse"}), "provider 'vllm'"))
    assert refused.value.status == 400
    assert refused.value.reason == "untranslatable"
    assert category in refused.value.message
    assert "provider 'vllm'" in refused.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": "nope"},
        {"model": "m", "messages": [{"role": "user", "content": [{"text": "no type"}]}]},
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "m", "messages": [], "tools": [{"description": "no name"}]},
        {"model": "m", "system": [1], "messages": []},
    ],
)
def test_malformed_anthropic_request_is_a_400(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as error:
        a2o.to_openai_request(body, Notes())
    assert error.value.status == 400


def test_claude_code_request_translates_sensibly() -> None:
    body = build_request()
    notes = Notes()
    out = a2o.to_openai_request(body, notes)
    assert len(out["tools"]) == len(body["tools"]) == 24
    assert {t["function"]["name"] for t in out["tools"]} == {t["name"] for t in body["tools"]}
    assert out["messages"][0]["role"] == "system"
    assert "Claude Code" in out["messages"][0]["content"]
    # every tool call is answered by a tool message right after its assistant turn
    for i, message in enumerate(out["messages"]):
        for j, call in enumerate(message.get("tool_calls") or ()):
            answer = out["messages"][i + 1 + j]
            assert answer == {**answer, "role": "tool", "tool_call_id": call["id"]}
    uses = sum(
        b["type"] == "tool_use"
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
    )
    calls = sum(len(m.get("tool_calls") or ()) for m in out["messages"])
    assert uses == calls > 0
    assert out["user"].startswith("sha256:")  # the long user_id, hashed
    assert notes.dropped == {"cache_control": notes.dropped["cache_control"]}
    orjson.dumps(out)
    # and back: the OpenAI shape of it, translated for an Anthropic provider, keeps the turns
    again = o2a.to_anthropic_request(out, Notes())
    assert [t["name"] for t in again["tools"]] == [t["name"] for t in body["tools"]]
    assert again["max_tokens"] == body["max_tokens"]
    tool_ids = [b["id"] for m in again["messages"] for b in m["content"] if b["type"] == "tool_use"]
    result_ids = [
        b["tool_use_id"]
        for m in again["messages"]
        for b in m["content"]
        if b["type"] == "tool_result"
    ]
    assert tool_ids == result_ids
    assert all(
        a["role"] != b["role"]
        for a, b in zip(again["messages"], again["messages"][1:], strict=False)
    )


# --- OpenAI answer -> Anthropic message ----------------------------------------------------


def test_openai_completion_to_message_with_tools_and_cached_usage() -> None:
    completion = fixture_json("openai_stream_tools.folded.json")
    completion["usage"]["prompt_tokens_details"]["cached_tokens"] = 50
    message = a2o.to_anthropic_message(completion, Notes(), model="claude-sonnet-4-6")
    assert message["model"] == "claude-sonnet-4-6"
    assert message["id"].startswith("msg_")
    assert message["stop_reason"] == "tool_use"
    assert message["content"] == [
        {
            "type": "tool_use",
            "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
            "name": "get_weather",
            "input": {"location": "Paris, France"},
        },
        {
            "type": "tool_use",
            "id": "call_ABCdef",
            "name": "get_time",
            "input": {"tz": "Europe/Paris"},
        },
    ]
    assert message["usage"] == {
        "input_tokens": 32,
        "output_tokens": 51,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 50,
    }


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
        ("weird", "end_turn"),
    ],
)
def test_finish_reason_to_stop_reason(finish: str | None, stop: str) -> None:
    completion = {"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}
    assert a2o.to_anthropic_message(completion, Notes())["stop_reason"] == stop


def test_bad_tool_arguments_become_empty_input_noted() -> None:
    completion = {
        "choices": [
            {
                "message": {
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    notes = Notes()
    message = a2o.to_anthropic_message(completion, notes)
    assert message["content"][0]["input"] == {}
    assert notes.dropped == {"tool_arguments": 1}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_openai_error_to_anthropic_error(status: int, kind: str) -> None:
    body = {"error": {"message": "boom", "type": "whatever", "code": None}}
    assert orjson.loads(anthropic_error(status, body)) == {
        "type": "error",
        "error": {"type": kind, "message": "boom"},
    }


def test_anthropic_error_to_openai_error() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    out = orjson.loads(openai_error(529, body))
    assert out["error"]["message"] == "busy"
    assert out["error"]["code"] == "overloaded_error"
    assert (
        orjson.loads(openai_error(502, b"junk"))["error"]["message"]
        == "the provider answered HTTP 502"
    )


# --- OpenAI stream -> Anthropic events -----------------------------------------------------


def translate_openai_stream(
    raw: bytes, model: str | None = None
) -> tuple[list[dict[str, Any]], Notes]:
    notes = Notes()
    stream = a2o.StreamTranslator(notes, model=model)
    out: list[dict[str, Any]] = []
    for event in events_of(raw):
        if event.data.startswith("[DONE]"):
            out += stream.finish()
        else:
            out += stream.feed(orjson.loads(event.data))
    out += stream.finish()
    return out, notes


@pytest.mark.parametrize("name", ["openai_stream_tools", "openai_stream_text"])
def test_openai_stream_folds_like_the_translated_completion(name: str) -> None:
    events, _ = translate_openai_stream(fixture_bytes(f"{name}.sse"), model="claude-x")
    accumulator = anthropic_api.StreamAccumulator()
    for event in anthropic_sse(events):
        accumulator.feed(event)
    assert accumulator.malformed_events == 0
    folded = accumulator.folded_message()
    expected = a2o.to_anthropic_message(
        fixture_json(f"{name}.folded.json"), Notes(), model="claude-x"
    )
    assert folded["content"] == expected["content"]
    assert folded["stop_reason"] == expected["stop_reason"]
    assert accumulator.usage == anthropic_api.usage_from_message(expected)
    # the official SDK's accumulator agrees
    snapshot = None
    buffers: dict[int, bytes] = {}
    for item in events:
        if item["type"] != "ping":
            snapshot = accumulate_event(event=item, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    assert [b.model_dump(exclude_none=True) for b in snapshot.content] == expected["content"]


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "model": "gpt",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def call(
    index: int, arguments: str, name: str | None = None, call_id: str | None = None
) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name:
        function["name"] = name
    out: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        out["id"] = call_id
    return out


def test_openai_stream_event_sequence_text_then_parallel_tools() -> None:
    notes = Notes()
    stream = a2o.StreamTranslator(notes)
    events: list[dict[str, Any]] = []
    for piece in [
        chunk({"role": "assistant", "content": "Let me"}),
        chunk({"content": " check."}),
        chunk({"tool_calls": [call(0, "", "wx", "a")]}),
        chunk({"tool_calls": [call(0, '{"c":')]}),
        chunk({"tool_calls": [call(0, '"Oslo"}')]}),
        chunk({"tool_calls": [call(1, '{"z":1}', "tz", "b")]}),
        chunk({}, "tool_calls"),
        {
            "id": "c1",
            "choices": [],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 6},
            },
        },
    ]:
        events += stream.feed(piece)
    events += stream.finish()
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None),
    ]  # fmt: skip
    assert events[6]["content_block"] == {"type": "tool_use", "id": "a", "name": "wx", "input": {}}
    assert [e["delta"]["partial_json"] for e in events[7:9]] == ['{"c":', '"Oslo"}']
    assert events[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 4,
            "output_tokens": 4,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 6,
        },
    }
    assert stream.feed(chunk({"content": "late"})) == []
    assert notes.dropped == {}


def test_openai_stream_error_mid_stream_becomes_error_event() -> None:
    stream = a2o.StreamTranslator(Notes())
    first = stream.feed(chunk({"content": "hi"}))
    assert first[0]["type"] == "message_start"
    assert stream.feed({"error": {"message": "rate limited", "type": "rate_limit_exceeded"}}) == [
        {"type": "error", "error": {"type": "rate_limit_error", "message": "rate limited"}}
    ]
    assert stream.finish() == []


def test_openai_stream_interleaved_tool_calls_lose_nothing() -> None:
    notes = Notes()
    stream = a2o.StreamTranslator(notes)
    events: list[dict[str, Any]] = []
    for piece in [
        chunk({"tool_calls": [call(0, '{"a":', "f", "x"), call(1, '{"b":', "g", "y")]}),
        chunk({"tool_calls": [call(0, "1}"), call(1, "2}")]}),
        chunk({}, "tool_calls"),
    ]:
        events += stream.feed(piece)
    events += stream.finish()
    snapshot = None
    buffers: dict[int, bytes] = {}
    for event in events:
        if event["type"] != "ping":
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    assert [b.input for b in snapshot.content] == [{"a": 1}, {"b": 2}]  # type: ignore[union-attr]
    assert notes.dropped == {"stream_interleave": 1}


def test_reasoning_from_provider_is_noted_once() -> None:
    notes = Notes()
    stream = a2o.StreamTranslator(notes)
    for _ in range(3):
        stream.feed(chunk({"reasoning_content": "hmm"}))
    assert notes.dropped == {"reasoning": 1}


def test_empty_openai_stream_still_makes_a_valid_message() -> None:
    events = a2o.StreamTranslator(Notes()).finish()
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]


# --- OpenAI request -> Anthropic request ---------------------------------------------------


O_REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "system + developer to system blocks, defaults, stop string, user, stream",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "one"},
                {"role": "developer", "content": [{"type": "text", "text": "two"}]},
                {"role": "user", "content": "hi", "name": "bob"},
            ],
            "stop": "END",
            "user": "u1",
            "temperature": 0.5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {
            "model": "m",
            "system": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 4096,
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "metadata": {"user_id": "u1"},
            "stream": True,
        },
    ),
    (
        "tool calls and tool messages; images; max_completion_tokens wins",
        {
            "model": "m",
            "max_completion_tokens": 50,
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "see"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                        {"type": "image_url", "image_url": {"url": "https://x/i.png"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"c":"Oslo"}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "tz", "arguments": ""},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "rain"},
                {
                    "role": "tool",
                    "tool_call_id": "c2",
                    "content": [{"type": "text", "text": "CET"}],
                },
                {"role": "user", "content": "and?"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "wx",
                        "description": "d",
                        "parameters": {"type": "object"},
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "wx"}},
            "parallel_tool_calls": False,
        },
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "see"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "c1", "name": "wx", "input": {"c": "Oslo"}},
                        {"type": "tool_use", "id": "c2", "name": "tz", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "c1", "content": "rain"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "c2",
                            "content": [{"type": "text", "text": "CET"}],
                        },
                        {"type": "text", "text": "and?"},
                    ],
                },
            ],
            "max_tokens": 50,
            "tools": [{"name": "wx", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "wx", "disable_parallel_tool_use": True},
        },
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "expected"), O_REQUEST_CASES, ids=[c[0] for c in O_REQUEST_CASES]
)
def test_openai_request_to_anthropic(
    name: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    notes = Notes()
    assert o2a.to_anthropic_request(body, notes) == expected
    assert notes.dropped == {}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"})],
)
def test_openai_tool_choice_strings(choice: str, expected: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "messages": [],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": choice,
    }
    out = o2a.to_anthropic_request(body, Notes())
    assert out["tool_choice"] == expected
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


def test_cache_prefix_marks_tools_system_and_conversation() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "long stable prompt"},
            {"role": "user", "content": "q"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "a"}},
            {"type": "function", "function": {"name": "b"}},
        ],
    }
    out = o2a.to_anthropic_request(body, Notes(), o2a.RequestOptions(cache_prefix=True))
    mark = {"type": "ephemeral"}
    assert "cache_control" not in out["tools"][0]
    assert out["tools"][1]["cache_control"] == mark
    assert out["system"][-1]["cache_control"] == mark
    assert out["messages"][-1]["content"][-1]["cache_control"] == mark
    assert "cache_control" not in o2a.to_anthropic_request(body, Notes())["system"][-1]


def test_client_cache_control_on_parts_is_kept_and_not_doubled() -> None:
    part = {"type": "text", "text": "big", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": [part]}, {"role": "user", "content": "q"}],
    }
    out = o2a.to_anthropic_request(body, Notes(), o2a.RequestOptions(cache_prefix=True))
    assert out["system"] == [
        {"type": "text", "text": "big", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ]
    assert out["messages"][-1]["content"] == [{"type": "text", "text": "q"}]


O_LOSSES: list[tuple[str, dict[str, Any]]] = [
    ("sampling", {"temperature": 1.5}),
    ("sampling", {"presence_penalty": 0.5}),
    ("sampling", {"logprobs": True}),
    ("n", {"n": 3}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("reasoning", {"reasoning_effort": "high"}),
    (
        "documents",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}
                    ],
                }
            ]
        },
    ),
    (
        "documents",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}
                    ],
                }
            ]
        },
    ),
    (
        "tool_arguments",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
                }
            ]
        },
    ),
    ("beta", {"web_search_options": {}}),
    ("beta", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
]


@pytest.mark.parametrize(("category", "fragment"), O_LOSSES)
def test_openai_losses_drop_with_a_note_or_refuse(category: str, fragment: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fragment}
    notes = Notes()
    out = o2a.to_anthropic_request(body, notes)
    assert notes.dropped.get(category, 0) >= 1, notes.dropped
    assert out.get("temperature", 0) <= 1
    with pytest.raises(Untranslatable):
        o2a.to_anthropic_request(body, Notes(REFUSE_ALL))


def test_pdf_parts_become_documents() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}
                ],
            }
        ],
    }
    out = o2a.to_anthropic_request(body, Notes())
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        }
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"model": "m", "messages": [{"role": "tool", "content": "no id"}]},
        {"model": "m", "messages": [], "temperature": "hot"},
    ],
)
def test_malformed_openai_request_is_a_400(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        o2a.to_anthropic_request(body, Notes())


# --- Anthropic answer -> OpenAI completion -------------------------------------------------


def test_message_to_completion() -> None:
    message = fixture_json("anthropic_message.json")
    out = o2a.to_openai_completion(message, Notes(), model="gpt-4", created=7)
    assert out["object"] == "chat.completion"
    assert out["model"] == "gpt-4"
    assert out["created"] == 7
    assert out["choices"][0]["message"]["content"] == "Hi! My name is Claude."
    assert out["choices"][0]["finish_reason"] == "stop"
    assert openai_api.usage_from_completion(out) == anthropic_api.usage_from_message(message)


def test_message_with_thinking_and_tool_use_to_completion() -> None:
    message = {
        "id": "msg_1",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    notes = Notes()
    out = o2a.to_openai_completion(message, notes)
    assert out["id"] == "chatcmpl-1"
    reply = out["choices"][0]["message"]
    assert reply["content"] == "ok"
    assert reply["tool_calls"] == [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert notes.dropped == {"thinking": 1}


# --- Anthropic stream -> OpenAI chunks -----------------------------------------------------


def translate_anthropic_stream(raw: bytes, include_usage: bool) -> tuple[list[Any], Notes]:
    notes = Notes()
    stream = o2a.StreamTranslator(notes, include_usage, model="gpt-4")
    out: list[Any] = []
    for event in events_of(raw):
        out += stream.feed(orjson.loads(event.data))
    return out + stream.finish(), notes


def test_anthropic_stream_folds_like_the_translated_message() -> None:
    chunks, notes = translate_anthropic_stream(fixture_bytes("anthropic_stream_tool_use.sse"), True)
    assert chunks[-1] == "[DONE]"
    accumulator = openai_api.StreamAccumulator()
    for event in openai_sse(chunks):
        accumulator.feed(event)
    assert accumulator.complete
    assert accumulator.malformed_events == 0
    folded = accumulator.folded_message()
    expected = o2a.to_openai_completion(
        fixture_json("anthropic_stream_tool_use.folded.json"), Notes(), model="gpt-4"
    )

    def calls(completion: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in completion["choices"][0]["message"]["tool_calls"]
        ]

    assert calls(folded) == calls(expected)
    assert (
        folded["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    )
    assert folded["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert accumulator.usage == openai_api.usage_from_completion(expected)
    assert notes.dropped == {"thinking": 1}


def test_anthropic_stream_without_include_usage_has_no_usage_chunk() -> None:
    chunks, _ = translate_anthropic_stream(fixture_bytes("anthropic_stream_tool_use.sse"), False)
    assert all(c == "[DONE]" or c["choices"] for c in chunks)


def test_anthropic_stream_error_event_becomes_error_chunk() -> None:
    chunks, _ = translate_anthropic_stream(fixture_bytes("anthropic_stream_overloaded.sse"), True)
    assert chunks[-1]["error"]["code"] == "overloaded_error"
    accumulator = openai_api.StreamAccumulator()
    for event in openai_sse(chunks):
        accumulator.feed(event)
    assert accumulator.error is not None


def test_anthropic_stream_text_deltas() -> None:
    stream = o2a.StreamTranslator(Notes(), include_usage=True, created=3)
    out: list[Any] = []
    script: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_9",
                "model": "claude",
                "usage": {"input_tokens": 5, "cache_read_input_tokens": 7},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]
    for event in script:
        out += stream.feed(event)
    assert [c["choices"][0]["delta"] if c != "[DONE]" and c["choices"] else c for c in out][:3] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
    ]
    assert out[3]["choices"][0]["finish_reason"] == "length"
    assert out[4]["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 7, "cache_write_tokens": 0},
    }
    assert out[4]["id"] == "chatcmpl-9"
    assert out[5] == "[DONE]"


# --- the translator slot (SSE events in and out) and the route's settings -------------------


def test_slot_anthropic_client_on_openai_end_to_end_bytes() -> None:
    from extproc.translate.config import TranslationConfig
    from extproc.translate.slot import AnthropicClientOnOpenAI

    slot = AnthropicClientOnOpenAI(TranslationConfig(), Notes(), "claude-sonnet-4-6")
    body, path = slot.request(
        {"model": "qwen", "max_tokens": 5, "messages": []}, "/v1/messages?beta=true"
    )
    assert path == "/v1/chat/completions?beta=true"
    assert body["max_tokens"] == 5
    events = slot.stream()
    parser = SseParser()
    out: list[SseEvent] = []
    raw = fixture_bytes("openai_stream_tools.sse")
    for start in range(0, len(raw), 37):  # chunk boundaries mean nothing
        for event in parser.feed(raw[start : start + 37]):
            out += events.feed(event)
    out += events.feed(SseEvent(None, "not json"))
    out += events.close()
    assert events.malformed_events == 1
    accumulator = anthropic_api.StreamAccumulator()
    for event in out:
        accumulator.feed(event)
    folded = accumulator.folded_message()
    assert folded["model"] == "claude-sonnet-4-6"
    assert [b["name"] for b in folded["content"]] == ["get_weather", "get_time"]
    error = slot.answer({"error": {"message": "nope"}}, 429)
    assert error == {"type": "error", "error": {"type": "rate_limit_error", "message": "nope"}}


def test_slot_openai_client_on_anthropic_end_to_end_bytes() -> None:
    from extproc.translate.config import TranslationConfig
    from extproc.translate.slot import OpenAIClientOnAnthropic

    settings = TranslationConfig(default_max_tokens=77, cache_prefix=True)
    slot = OpenAIClientOnAnthropic(settings, Notes(), "gpt-4", include_usage=False, created=5)
    body, path = slot.request(
        {"model": "claude", "messages": [{"role": "user", "content": "q"}]}, "/v1/chat/completions"
    )
    assert path == "/v1/messages"
    assert body["max_tokens"] == 77
    assert body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    events = slot.stream()
    out: list[SseEvent] = []
    for event in events_of(fixture_bytes("anthropic_stream_tool_use.sse")):
        out += events.feed(event)
    out += events.close()
    accumulator = openai_api.StreamAccumulator()
    for event in out:
        accumulator.feed(event)
    assert accumulator.complete
    assert not accumulator.final_usage_seen  # the caller did not ask for the usage chunk
    assert accumulator.folded_message()["model"] == "gpt-4"
    error = slot.answer(
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, 529
    )
    assert error["error"]["code"] == "overloaded_error"
    assert slot.answer(fixture_json("anthropic_message.json"), 200)["created"] == 5


def test_translation_config_categories_are_checked() -> None:
    from pydantic import ValidationError

    from extproc.translate.config import TranslationConfig

    settings = TranslationConfig(untranslatable="refuse", drop=("cache_control",))
    lossy = settings.lossy()
    assert lossy.action("cache_control") == "drop"
    assert lossy.action("thinking") == "refuse"
    assert TranslationConfig(refuse=("thinking",)).lossy().action("thinking") == "refuse"
    with pytest.raises(ValidationError, match="unknown categories"):
        TranslationConfig(refuse=("thoughts",))
    with pytest.raises(ValidationError, match="both"):
        TranslationConfig(refuse=("n",), drop=("n",))


def test_model_lists_across_shapes() -> None:
    from extproc.translate.models import literal_names, to_anthropic_list, to_openai_list

    anthropic_list = {
        "data": [
            {
                "type": "model",
                "id": "claude-sonnet-4-6",
                "display_name": "Claude Sonnet 4.6",
                "created_at": "2025-01-01T00:00:00Z",
            },
            {"junk": 1},
        ],
        "has_more": False,
    }
    assert to_openai_list(anthropic_list) == {
        "object": "list",
        "data": [
            {
                "id": "claude-sonnet-4-6",
                "object": "model",
                "created": 1735689600,
                "owned_by": "anthropic",
            }
        ],
    }
    openai_list = {
        "object": "list",
        "data": [{"id": "qwen3-32b", "object": "model", "created": 1735689600, "owned_by": "vllm"}],
    }
    assert to_anthropic_list(openai_list) == {
        "data": [
            {
                "type": "model",
                "id": "qwen3-32b",
                "display_name": "qwen3-32b",
                "created_at": "2025-01-01T00:00:00Z",
            }
        ],
        "has_more": False,
        "first_id": "qwen3-32b",
        "last_id": "qwen3-32b",
    }
    assert to_anthropic_list({"data": None})["data"] == []
    assert literal_names(["gpt-4", "claude-*", "gpt-4o-mini", "o[13]"]) == ["gpt-4", "gpt-4o-mini"]


# --- junk never crashes a translator ---------------------------------------------------------


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.sampled_from(["", "text", "tool_use", "user", "assistant", "tool", "image", "auto", "{}"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "role",
                    "content",
                    "text",
                    "messages",
                    "tools",
                    "choices",
                    "delta",
                    "tool_calls",
                    "index",
                    "function",
                    "arguments",
                    "name",
                    "id",
                    "input",
                    "source",
                    "message",
                    "usage",
                    "error",
                    "content_block",
                    "finish_reason",
                    "stop_reason",
                    "tool_choice",
                    "system",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "model",
                "messages",
                "system",
                "tools",
                "tool_choice",
                "stream",
                "max_tokens",
                "stop",
                "temperature",
            ]
        ),
        _json,
        max_size=5,
    )
)
def test_request_translators_raise_only_bad_request(body: dict[str, Any]) -> None:
    for translate in (a2o.to_openai_request, o2a.to_anthropic_request):
        with contextlib.suppress(BadRequest):
            orjson.dumps(translate(body, Notes()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(
        st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "choices",
                    "delta",
                    "index",
                    "message",
                    "content_block",
                    "usage",
                    "error",
                    "id",
                ]
            ),
            _json,
            max_size=4,
        ),
        max_size=6,
    )
)
def test_stream_and_answer_translators_never_raise(events: list[dict[str, Any]]) -> None:
    forward, backward = (
        a2o.StreamTranslator(Notes()),
        o2a.StreamTranslator(Notes(), include_usage=True),
    )
    for event in events:
        orjson.dumps(forward.feed(event))
        orjson.dumps(backward.feed(event))
        orjson.dumps(a2o.to_anthropic_message(event, Notes()))
        orjson.dumps(o2a.to_openai_completion(event, Notes()))
    orjson.dumps(forward.finish())
    orjson.dumps(backward.finish())


def test_tool_names_openai_refuses_are_stood_in_and_restored() -> None:
    from extproc.translate.config import TranslationConfig
    from extproc.translate.slot import AnthropicClientOnOpenAI

    long_name = "mcp__" + "very_long_server_name_" * 3 + "__create.issue"
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": long_name, "input": {}}],
            }
        ],
        "tools": [
            {"name": long_name, "input_schema": {"type": "object"}},
            {"name": "Read", "input_schema": {}},
        ],
        "tool_choice": {"type": "tool", "name": long_name},
    }
    slot = AnthropicClientOnOpenAI(TranslationConfig(), Notes(), "claude")
    out, _ = slot.request(body, "/v1/messages")
    stand_in = out["tools"][0]["function"]["name"]
    assert stand_in == a2o.openai_tool_name(long_name)
    assert len(stand_in) <= 64
    assert stand_in.replace("_", "").replace("-", "").isalnum()
    assert out["tools"][1]["function"]["name"] == "Read"
    assert out["messages"][0]["tool_calls"][0]["function"]["name"] == stand_in
    assert out["tool_choice"]["function"]["name"] == stand_in
    answer = {
        "choices": [
            {
                "message": {
                    "tool_calls": [{"id": "c", "function": {"name": stand_in, "arguments": "{}"}}]
                }
            }
        ]
    }
    assert slot.answer(answer, 200)["content"][0]["name"] == long_name
    events = slot.stream()
    opening = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 0, "id": "c", "function": {"name": stand_in, "arguments": ""}}
                    ]
                },
            }
        ]
    }
    started = [
        orjson.loads(e.data) for e in events.feed(SseEvent(None, orjson.dumps(opening).decode()))
    ]
    assert started[-1]["content_block"]["name"] == long_name


def test_registry_binds_per_request_and_lists_models() -> None:
    from extproc.translate.config import TranslationConfig
    from extproc.translate.registry import PAIRS, bind, upstream_header_changes
    from extproc.upstream import translator_for

    pair = translator_for("anthropic", "openai")
    assert pair is PAIRS[("anthropic", "openai")]
    notes = Notes()
    bound = bind(pair, TranslationConfig(), notes, models=False, created=0)
    assert bound is not None
    assert bound.notes is notes
    assert bind(object(), TranslationConfig(), notes, models=False, created=0) is None
    listing = bind(pair, TranslationConfig(), notes, models=True, created=0)
    assert listing is not None
    openai_list = {"object": "list", "data": [{"id": "qwen", "object": "model", "created": 0}]}
    assert listing.answer(openai_list, 200)["data"][0]["type"] == "model"
    assert listing.answer({"id": "qwen", "object": "model"}, 200)["type"] == "model"
    assert listing.answer({"error": {"message": "no"}}, 404)["error"]["type"] == "not_found_error"
    # unbound, a pair still translates (default settings)
    _body, path = pair.request({"model": "m", "max_tokens": 1, "messages": []}, "/v1/messages")
    assert path == "/v1/chat/completions"
    assert upstream_header_changes("openai", "anthropic") == (
        (("anthropic-version", "2023-06-01"),),
        ("openai-organization", "openai-project", "openai-beta"),
    )
    assert upstream_header_changes("anthropic", "openai")[1][0] == "anthropic-version"
    assert upstream_header_changes("openai", "openai") == ((), ())


def test_a_cut_stream_stays_cut_through_the_slot() -> None:
    from extproc.translate.config import TranslationConfig
    from extproc.translate.slot import AnthropicClientOnOpenAI, OpenAIClientOnAnthropic

    a_events = AnthropicClientOnOpenAI(TranslationConfig(), Notes(), None).stream()
    out = a_events.feed(SseEvent(None, orjson.dumps(chunk({"content": "half"})).decode()))
    out += a_events.close()
    assert "message_stop" not in [e.event for e in out]
    finished = AnthropicClientOnOpenAI(TranslationConfig(), Notes(), None).stream()
    finished.feed(SseEvent(None, orjson.dumps(chunk({"content": "all"}, "stop")).decode()))
    assert [e.event for e in finished.close()][-1] == "message_stop"  # no [DONE], but finished
    slot = OpenAIClientOnAnthropic(
        TranslationConfig(), Notes(), None, include_usage=True, created=0
    )
    o_events = slot.stream()
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {}}}
    o_events.feed(SseEvent("message_start", orjson.dumps(start).decode()))
    assert o_events.close() == []


def test_beta_headers_are_noted_or_refused() -> None:
    from extproc.translate.registry import note_beta_headers

    notes = Notes()
    note_beta_headers("anthropic", {"anthropic-beta": "context-1m-2025-08-07"}, notes)
    note_beta_headers("anthropic", {"openai-beta": "x"}, notes)
    assert notes.dropped == {"beta": 1}
    with pytest.raises(Untranslatable, match="anthropic-beta header"):
        note_beta_headers(
            "anthropic", {"anthropic-beta": "x"}, Notes(Lossy(fields={"beta": "refuse"}))
        )


def test_config_names_the_key_of_an_unknown_category() -> None:
    from extproc.config import ConfigError, parse_config

    data: dict[str, Any] = {
        "providers": {"vllm": {"api": "openai", "base_url": "http://vllm:8000"}},
        "profiles": {"default": {"translation": {"refuse": ["thoughts"]}}},
    }
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert "profiles.default.translation.refuse" in str(error.value)
    assert "thinking" in str(error.value)  # the known categories are listed
    data["profiles"]["default"]["translation"] = {"refuse": ["thinking"], "cache_prefix": True}
    data["auth"] = {"keys": [{"id": "k", "hash": "sha256:" + "0" * 64, "map": {"gpt-4": "c"}}]}
    config = parse_config(data)
    assert config.profiles["default"].translation.lossy().action("thinking") == "refuse"
    assert config.auth.keys[0].map == {"gpt-4": "c"}


def test_tool_calls_without_index_are_told_apart_by_id() -> None:
    stream = a2o.StreamTranslator(Notes())
    events: list[dict[str, Any]] = []
    no_index = [
        {"id": "a", "function": {"name": "f", "arguments": '{"x":'}},
        {"function": {"arguments": "1}"}},
        {"id": "b", "function": {"name": "g", "arguments": "{}"}},
    ]
    for call_ in no_index:
        events += stream.feed(chunk({"tool_calls": [call_]}))
    events += stream.feed(chunk({}, "tool_calls"))
    events += stream.finish()
    accumulator = anthropic_api.StreamAccumulator()
    for event in anthropic_sse(events):
        accumulator.feed(event)
    content = accumulator.folded_message()["content"]
    assert [(b["id"], b["name"], b["input"]) for b in content] == [
        ("a", "f", {"x": 1}),
        ("b", "g", {}),
    ]


def test_caller_without_output_limit_gets_the_default_not_the_gateway_bound() -> None:
    from extproc.translate.config import TranslationConfig
    from extproc.translate.registry import PAIRS

    pair = PAIRS[("openai", "anthropic")]
    settings = TranslationConfig(default_max_tokens=1000)
    caller: dict[str, Any] = {"model": "c", "messages": [{"role": "user", "content": "q"}]}
    bound = pair.bind(settings, Notes(), models=False, created=0, caller_body=caller)
    capped = {**caller, "max_completion_tokens": 64000}  # what the gateway's bound writes
    assert bound.request(capped, "/v1/chat/completions")[0]["max_tokens"] == 1000
    small = {**caller, "max_completion_tokens": 500}
    assert bound.request(small, "/v1/chat/completions")[0]["max_tokens"] == 500  # never above
    asked = {**caller, "max_tokens": 30000}
    bound = pair.bind(settings, Notes(), models=False, created=0, caller_body=asked)
    assert bound.request(asked, "/v1/chat/completions")[0]["max_tokens"] == 30000


_word = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=12).filter(str.strip)


@st.composite
def _conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """user/assistant turns of text, tool calls and their results, as Anthropic sends them."""
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": draw(_word)}]}
    ]
    for n in range(draw(st.integers(0, 3))):
        calls = [
            {
                "type": "tool_use",
                "id": f"t{n}_{i}",
                "name": draw(st.sampled_from(["Read", "Bash"])),
                "input": {"a": draw(_word)},
            }
            for i in range(draw(st.integers(0, 2)))
        ]
        text = [{"type": "text", "text": draw(_word)}] if draw(st.booleans()) or not calls else []
        turns.append({"role": "assistant", "content": text + calls})
        results: list[dict[str, Any]] = [
            {"type": "tool_result", "tool_use_id": c["id"], "content": draw(_word)} for c in calls
        ]
        turns.append({"role": "user", "content": [*results, {"type": "text", "text": draw(_word)}]})
    return turns


@settings(max_examples=200, deadline=None)
@given(turns=_conversations())
def test_anthropic_to_openai_and_back_keeps_the_conversation(turns: list[dict[str, Any]]) -> None:
    body = {"model": "m", "max_tokens": 9, "system": "sys", "messages": turns}
    notes = Notes()
    again = o2a.to_anthropic_request(a2o.to_openai_request(body, notes), notes)
    assert notes.dropped == {}
    assert again["system"] == [{"type": "text", "text": "sys"}]
    assert again["messages"] == turns
