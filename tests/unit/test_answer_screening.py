"""Every part of an answer a client renders or executes is screened: streamed tool calls
and thinking as well as text, in both shapes, JSON and SSE; and a cached answer on replay."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis import anthropic, openai
from extproc.apis.rewrite import JsonStrings
from extproc.apis.sse import SseParser, encode_event
from extproc.policies.guard import Guard, GuardConfig
from extproc.policies.guard.redact import redaction_placeholder
from extproc.policies.guard.run import GuardRun
from extproc.telemetry.metrics import Metrics

GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
TAG = redaction_placeholder("github_token", GH)


def _run(api: Any, masks: dict[str, str] | None = None) -> GuardRun:
    guard = Guard(GuardConfig.model_validate({"profiles": {"default": {}}})).profile()
    run = GuardRun(guard, api, Metrics())
    if masks:
        run.masks = masks
    return run


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


TOOL_INPUT = {"command": f"export T=\n{GH} && deploy", GH: "as a key", "n": 3, "q": 'say "hi"\\'}
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-opus-4-8",
    "content": [
        {"type": "thinking", "thinking": f"the user's key is {GH}.", "signature": "sig"},
        {"type": "text", "text": "Running it."},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": TOOL_INPUT},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 20},
}
REDACTED_INPUT = {
    "command": f"export T=\n{TAG} && deploy",
    TAG: "as a key",
    "n": 3,
    "q": 'say "hi"\\',
}


def _split_deltas(stream: bytes, size: int) -> bytes:
    """The stream with every delta's text cut into `size`-character deltas."""
    out = []
    parser = SseParser()
    for event in parser.feed(stream) + parser.close():
        payload = orjson.loads(event.data)
        delta = payload.get("delta") or {}
        fields = {
            "input_json_delta": "partial_json",
            "thinking_delta": "thinking",
            "text_delta": "text",
        }
        field = fields.get(str(delta.get("type")))
        if payload.get("type") != "content_block_delta" or field is None:
            out.append(encode_event(event.event, event.data))
            continue
        text = delta[field]
        for i in range(0, max(1, len(text)), size):
            piece = {**payload, "delta": {**delta, field: text[i : i + size]}}
            out.append(encode_event(event.event, orjson.dumps(piece).decode()))
    return b"".join(out)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 12), cuts=st.lists(st.integers(0, 100_000), max_size=10))
def test_streamed_tool_input_and_thinking_are_redacted_as_valid_json(
    size: int, cuts: list[int]
) -> None:
    stream = _split_deltas(anthropic.unfold_message(MESSAGE), size)
    run = _run("anthropic")
    rewriter = run.rewriter()
    out = b"".join(rewriter.feed(c) for c in _cut(stream, cuts)) + rewriter.close()
    accumulator = anthropic.StreamAccumulator()
    parser = SseParser()
    events = parser.feed(out) + parser.close()
    for event in events:
        accumulator.feed(event)
    kinds = [orjson.loads(e.data).get("delta", {}).get("type") for e in events]
    assert max(i for i, k in enumerate(kinds) if k == "thinking_delta") < kinds.index(
        "signature_delta"
    )
    folded = accumulator.folded_message()
    assert GH not in orjson.dumps(folded).decode()
    thinking, text, tool = folded["content"]
    assert thinking["thinking"] == f"the user's key is {TAG}."
    assert thinking["signature"] == "sig"
    assert text["text"] == "Running it."
    assert tool["input"] == REDACTED_INPUT  # the client's reassembled JSON parses


def test_json_answer_thinking_and_tool_input_are_redacted() -> None:
    replaced, blocked = _run("anthropic").screen_answer(MESSAGE)
    assert blocked is None
    assert replaced is not None
    assert replaced["content"][0]["thinking"] == f"the user's key is {TAG}."
    assert replaced["content"][2]["input"] == REDACTED_INPUT  # as the stream gives it


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-5",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return encode_event(None, orjson.dumps(chunk).decode())


@pytest.mark.parametrize("size", [1, 3, 7, 40])
def test_streamed_openai_tool_arguments_and_refusal_are_redacted(size: int) -> None:
    args = orjson.dumps({"cmd": f"curl -H 'x: {GH}'", "tail": GH[:10]}).decode()
    parts = [_chunk({"role": "assistant", "content": None})]
    parts.append(
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "sh", "arguments": ""},
                    }
                ]
            }
        )
    )
    for i in range(0, len(args), size):
        parts.append(
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + size]}}]})
        )
    parts += [_chunk({"refusal": f"no: {GH[:20]}"}), _chunk({"refusal": GH[20:]})]
    parts += [_chunk({}, "tool_calls"), encode_event(None, "[DONE]")]
    rewriter = _run("openai").rewriter()
    out = b"".join(rewriter.feed(p) for p in parts) + rewriter.close()
    accumulator = openai.StreamAccumulator()
    parser = SseParser()
    for event in parser.feed(out) + parser.close():
        accumulator.feed(event)
    folded = accumulator.folded_message()
    assert GH not in orjson.dumps(folded).decode()
    message = folded["choices"][0]["message"]
    call = message["tool_calls"][0]
    assert orjson.loads(call["function"]["arguments"]) == {
        "cmd": f"curl -H 'x: {TAG}'",
        "tail": GH[:10],
    }
    assert call["id"] == "call_1"
    assert message["refusal"] == f"no: {TAG}"


def test_json_answer_openai_refusal_and_legacy_function_call_are_redacted() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "refusal": f"key {GH}",
                    "function_call": {
                        "name": "f",
                        "arguments": orjson.dumps({"k": f"line\n{GH}", GH: 1}).decode(),
                    },
                },
            }
        ]
    }
    replaced, _ = _run("openai").screen_answer(body)
    assert replaced is not None
    assert GH not in orjson.dumps(replaced).decode()
    message = replaced["choices"][0]["message"]
    assert message["refusal"] == f"key {TAG}"
    # After an escaped line break, and as a key: the arguments are screened decoded.
    assert orjson.loads(message["function_call"]["arguments"]) == {"k": f"line\n{TAG}", TAG: 1}


class Upper:
    """A transform that shows what JsonStrings feeds it: the decoded string contents."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def feed(self, text: str) -> str:
        self.seen.append(text)
        return text.upper()

    def flush(self) -> str:
        return ""


@settings(max_examples=60, deadline=None)
@given(
    value=st.recursive(
        st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=6,
    ),
    size=st.integers(1, 9),
)
def test_json_strings_transforms_only_string_contents_and_stays_json(value: Any, size: int) -> None:
    raw = orjson.dumps(value).decode() if not _has_surrogate(value) else "null"
    transform = JsonStrings(Upper)
    out = "".join(transform.feed(raw[i : i + size]) for i in range(0, len(raw), size))
    out += transform.flush()
    assert orjson.loads(out) == orjson.loads(orjson.dumps(_upper(orjson.loads(raw))))


def _has_surrogate(value: Any) -> bool:
    return "\\ud" in repr(value)


def _upper(value: Any) -> Any:
    if isinstance(value, str):
        return value.upper()
    if isinstance(value, list):
        return [_upper(v) for v in value]
    if isinstance(value, dict):
        return {_upper(k): _upper(v) for k, v in value.items()}
    return value


SEARCH_RESULT = {
    "type": "web_search_tool_result",
    "tool_use_id": "srvtoolu_1",
    "content": [
        {
            "type": "web_search_result",
            "title": f"leak {GH}",
            "url": "https://e.test",
            "encrypted_content": "enc",
        }
    ],
}


def test_blocks_that_arrive_whole_are_screened_json_and_streamed() -> None:
    message = {**MESSAGE, "content": [SEARCH_RESULT, {"type": "text", "text": "found it"}]}
    replaced, _ = _run("anthropic").screen_answer(message)
    assert replaced is not None
    assert replaced["content"][0]["content"][0]["title"] == f"leak {TAG}"
    assert replaced["content"][0]["content"][0]["encrypted_content"] == "enc"
    rewriter = _run("anthropic").rewriter()
    out = rewriter.feed(anthropic.unfold_message(message)) + rewriter.close()
    assert GH.encode() not in out
    assert TAG.encode() in out


def test_masked_values_are_restored_inside_streamed_tool_input() -> None:
    original = 'Ann "the boss" <ann@corp.example>'
    message = {
        **MESSAGE,
        "content": [{"type": "tool_use", "id": "t", "name": "Mail", "input": {"to": "[EMAIL_1]"}}],
    }
    stream = _split_deltas(anthropic.unfold_message(message), 2)
    rewriter = _run("anthropic", masks={"[EMAIL_1]": original}).rewriter()
    out = rewriter.feed(stream) + rewriter.close()
    accumulator = anthropic.StreamAccumulator()
    parser = SseParser()
    for event in parser.feed(out) + parser.close():
        accumulator.feed(event)
    assert accumulator.folded_message()["content"][0]["input"] == {"to": original}
