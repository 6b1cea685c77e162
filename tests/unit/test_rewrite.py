"""The SSE text rewriter: any chunking, held-back text released in order, stops."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis import anthropic, openai
from extproc.apis.rewrite import SseTextRewriter, StopAnswer
from extproc.apis.sse import SseParser

WORD = "SECRET"


class Redact:
    """Replaces WORD with [X]; holds back a tail that could start WORD."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> str:
        self.buffer = (self.buffer + text).replace(WORD, "[X]")
        keep = next((n for n in range(len(WORD) - 1, 0, -1) if self.buffer.endswith(WORD[:n])), 0)
        out, self.buffer = (
            self.buffer[: len(self.buffer) - keep],
            self.buffer[len(self.buffer) - keep :],
        )
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Block:
    def feed(self, text: str) -> str:
        if "forbidden" in text:
            raise StopAnswer("the answer matched a deny pattern", "deny")
        return text

    def flush(self) -> str:
        return ""


def message(text: str) -> dict[str, object]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }


def split_stream(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


def fold_anthropic(raw: bytes) -> dict[str, object]:
    parser, acc = SseParser(), anthropic.StreamAccumulator()
    for event in parser.feed(raw) + parser.close():
        acc.feed(event)
    return acc.folded_message()


def text_deltas(texts: list[str]) -> bytes:
    """An Anthropic stream whose text arrives in the given deltas."""
    start = anthropic.unfold_message(message(""))
    events = start.split(b"\n\n")
    head = [e for e in events if b"message_start" in e or b"content_block_start" in e]
    tail = [
        e
        for e in events
        if b"content_block_stop" in e or b"message_delta" in e or b"message_stop" in e
    ]
    deltas = [
        b"event: content_block_delta\ndata: "
        + orjson.dumps(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
        )
        for t in texts
    ]
    return b"\n\n".join(head + deltas + tail) + b"\n\n"


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from(["abc ", "SEC", "RET", "S", "ECRET", " x", "SECRET", "é"]), max_size=12
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_anthropic_text_is_rewritten_whatever_the_chunking(
    pieces: list[str], cuts: list[int]
) -> None:
    stream = text_deltas(pieces)
    rewriter = SseTextRewriter("anthropic", Redact)
    out = b"".join(rewriter.feed(chunk) for chunk in split_stream(stream, cuts)) + rewriter.close()
    folded = fold_anthropic(out)
    assert folded["content"] == [{"type": "text", "text": "".join(pieces).replace(WORD, "[X]")}]
    assert b"message_stop" in out


def test_openai_text_is_rewritten_and_held_text_lands_before_finish() -> None:
    stream = openai.unfold_completion(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "a SECRET b SEC"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    )
    rewriter = SseTextRewriter("openai", Redact)
    out = (
        b"".join(rewriter.feed(stream[i : i + 5]) for i in range(0, len(stream), 5))
        + rewriter.close()
    )
    parser, acc = SseParser(), openai.StreamAccumulator()
    for event in parser.feed(out) + parser.close():
        acc.feed(event)
    folded = acc.folded_message()
    assert folded["choices"][0]["message"]["content"] == "a [X] b SEC"
    assert folded["choices"][0]["finish_reason"] == "stop"
    assert out.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_stop_sends_an_error_event_and_nothing_more(api: str) -> None:
    if api == "anthropic":
        stream = text_deltas(["fine ", "forbidden words", " more"])
    else:
        body = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "forbidden"},
                    "finish_reason": "stop",
                }
            ],
        }
        stream = openai.unfold_completion(body)
    rewriter = SseTextRewriter(api, Block)  # type: ignore[arg-type]
    out = rewriter.feed(stream) + rewriter.close()
    assert rewriter.stopped is not None
    assert b"forbidden" not in out
    assert out.count(b"deny pattern") == 1
    assert b"message_stop" not in out
    assert rewriter.sent[-1].data.count("deny pattern") == 1
