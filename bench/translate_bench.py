"""What Anthropic ⇄ OpenAI translation costs, measured in-process (no sockets).

- request: the recorded-size Claude Code request (117 KB, 24 tools) translated from
  Anthropic Messages to OpenAI Chat Completions, and its OpenAI form translated back
  to Anthropic Messages; dict in, dict out (the gateway has already parsed the body),
  then the same including `orjson.dumps` of the result (what the upstream adapter sends);
- per streamed chunk: one provider event translated to the client's shape: the
  translator alone on a parsed event, and parse + translate + encode as SSE bytes,
  for text deltas and tool-call argument deltas, in both directions.

Targets (issue 13): <= 1 ms per request and <= 20 µs per chunk. Each figure is the
median of `--rounds` timed batches. Run: `python bench/translate_bench.py [--quick]`;
results go to bench/RESULTS.md (section "translate").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from _common import ROOT, load_average, table, write_section

from extproc.apis.sse import encode_event
from extproc.translate import Notes
from extproc.translate import anthropic_on_openai as a2o
from extproc.translate import openai_on_anthropic as o2a
from tests.data.claude_code_request import build_openai_request, build_request


def timed(func: Callable[[], object], batch: int, rounds: int) -> float:
    """Median µs per call over `rounds` batches of `batch` calls."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(batch):
            func()
        samples.append((time.perf_counter_ns() - start) / batch / 1000)
    return statistics.median(samples)


def request_rows(rounds: int) -> list[list[str]]:
    anthropic_body = build_request()
    openai_body = build_openai_request()
    openai_body["max_tokens"] = 8192
    size = len(orjson.dumps(anthropic_body))

    def a2o_only() -> object:
        return a2o.to_openai_request(anthropic_body, Notes())

    def a2o_bytes() -> object:
        return orjson.dumps(a2o.to_openai_request(anthropic_body, Notes()))

    def o2a_only() -> object:
        return o2a.to_anthropic_request(openai_body, Notes())

    def o2a_bytes() -> object:
        return orjson.dumps(o2a.to_anthropic_request(openai_body, Notes()))

    rows = []
    for name, func in [
        ("Anthropic -> OpenAI request (dict -> dict)", a2o_only),
        ("Anthropic -> OpenAI request (+ orjson.dumps)", a2o_bytes),
        ("OpenAI -> Anthropic request (dict -> dict)", o2a_only),
        ("OpenAI -> Anthropic request (+ orjson.dumps)", o2a_bytes),
    ]:
        us = timed(func, 50, rounds)
        rows.append([name, f"{size // 1024} KB", f"{us:.1f} µs", "<= 1000 µs", _ok(us <= 1000)])
    return rows


def _openai_chunk(delta: dict[str, Any]) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    chunk = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "qwen3-32b",
        "system_fingerprint": "fp_eb9dce56a8",
        "choices": [choice],
        "usage": None,
    }
    return orjson.dumps(chunk)


def _anthropic_delta(index: int, delta: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": "content_block_delta", "index": index, "delta": delta})


def chunk_rows(rounds: int) -> list[list[str]]:
    text = _openai_chunk({"content": "Let me look at the failing test first. "})
    tool = _openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"/src/app/'}}]})
    words = "Let me look at the failing test first. "
    a_text = _anthropic_delta(0, {"type": "text_delta", "text": words})
    a_tool = _anthropic_delta(1, {"type": "input_json_delta", "partial_json": '"/src/app/'})
    rows = []
    for label, raw in [("text delta", text), ("tool-call argument delta", tool)]:
        stream = _open_a2o_stream(raw)
        parsed = orjson.loads(raw)
        only = timed(lambda s=stream, p=parsed: s.feed(p), 2000, rounds)  # type: ignore[misc]
        full = timed(lambda s=stream, r=raw: _a2o_full(s, r), 2000, rounds)  # type: ignore[misc]
        rows += _chunk_rows(f"OpenAI -> Anthropic, {label}", only, full)
    for label, raw in [("text delta", a_text), ("tool-call argument delta", a_tool)]:
        o_stream = _open_o2a_stream()
        parsed = orjson.loads(raw)
        only = timed(lambda s=o_stream, p=parsed: s.feed(p), 2000, rounds)  # type: ignore[misc]
        full = timed(lambda s=o_stream, r=raw: _o2a_full(s, r), 2000, rounds)  # type: ignore[misc]
        rows += _chunk_rows(f"Anthropic -> OpenAI, {label}", only, full)
    return rows


def _open_a2o_stream(first: bytes) -> a2o.StreamTranslator:
    stream = a2o.StreamTranslator(Notes(), model="claude-sonnet-4-6")
    stream.feed(orjson.loads(first))  # message_start and the open block are behind us
    return stream


def _a2o_full(stream: a2o.StreamTranslator, raw: bytes) -> bytes:
    events = stream.feed(orjson.loads(raw))
    return b"".join(encode_event(e["type"], orjson.dumps(e).decode()) for e in events)


def _open_o2a_stream() -> o2a.StreamTranslator:
    stream = o2a.StreamTranslator(Notes(), include_usage=True, model="gpt-4")
    stream.feed(
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {}}}
    )
    stream.feed(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    tool = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}
    stream.feed({"type": "content_block_start", "index": 1, "content_block": tool})
    return stream


def _o2a_full(stream: o2a.StreamTranslator, raw: bytes) -> bytes:
    chunks = stream.feed(orjson.loads(raw))
    return b"".join(
        encode_event(None, c if isinstance(c, str) else orjson.dumps(c).decode()) for c in chunks
    )


def _chunk_rows(name: str, only: float, full: float) -> list[list[str]]:
    return [
        [f"{name} (translator)", "1 event", f"{only:.2f} µs", "<= 20 µs", _ok(only <= 20)],
        [
            f"{name} (parse + translate + SSE encode)",
            "1 event",
            f"{full:.2f} µs",
            "<= 20 µs",
            _ok(full <= 20),
        ],
    ]


def _ok(passed: bool) -> str:
    return "yes" if passed else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args()
    rounds = 5 if args.quick else 31
    rows = request_rows(rounds) + chunk_rows(rounds)

    text = "\n".join(
        [
            "## Anthropic ⇄ OpenAI translation cost (in-process)",
            "",
            f"Command: `python bench/translate_bench.py`; median of {rounds} batches; "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load {load_average()}.",
            "",
            table(["what", "size", "median", "target", "met"], rows),
        ]
    )
    print(text)
    if not args.no_write:
        write_section(ROOT / "bench" / "RESULTS.md", "translate", text, "Benchmark results")


if __name__ == "__main__":
    main()
