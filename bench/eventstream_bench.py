"""Cost of the AWS event-stream framing per chunk: decode, unwrap, re-encode.

A Bedrock streamed answer is a sequence of event-stream messages, each carrying one
Anthropic stream event as base64 JSON. The gateway decodes every message (both CRCs),
unwraps the event for its policies, and re-encodes when it changed something (a
redacted secret) or translates framing (event-stream <-> SSE for cross-serving).
This measures those steps per message on a realistic answer (300 text deltas of
~40 characters), fed as the provider's network delivers it (one message per read,
and 4 KB reads that cut messages), and compares with the SSE parser on the same
events. Pure CPU, one thread, no Envoy; runs in a few seconds.

    python bench/eventstream_bench.py            # prints and writes bench/RESULTS.md
    python bench/eventstream_bench.py --no-write
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import _common as c
import orjson

from extproc.apis.eventstream import (
    EventStreamDecoder,
    chunk_payload,
    encode_chunk,
)
from extproc.apis.sse import SseParser, encode_event

RESULTS = c.ROOT / "bench" / "RESULTS.md"
DELTAS = 300
ROUNDS = 15


def anthropic_events() -> list[bytes]:
    """The JSON of a streamed Anthropic answer: start, 300 text deltas, stop."""
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 9}}}
    events = [start, {"type": "content_block_start", "index": 0}]
    text = "The quick brown fox jumps over the dog. "
    delta = {"type": "text_delta", "text": text}
    events += [{"type": "content_block_delta", "index": 0, "delta": delta}] * DELTAS
    events += [{"type": "content_block_stop", "index": 0}]
    events += [{"type": "message_delta", "usage": {"output_tokens": DELTAS * 10}}]
    events += [{"type": "message_stop"}]
    return [orjson.dumps(e) for e in events]


def reads(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def decode_only(chunks: list[bytes]) -> None:
    decoder = EventStreamDecoder()
    for chunk in chunks:
        decoder.feed(chunk)


def decode_unwrap(chunks: list[bytes]) -> None:
    decoder = EventStreamDecoder()
    for chunk in chunks:
        for message in decoder.feed(chunk):
            orjson.loads(chunk_payload(message))


def decode_reencode(chunks: list[bytes]) -> None:
    decoder = EventStreamDecoder()
    for chunk in chunks:
        for message in decoder.feed(chunk):
            encode_chunk(chunk_payload(message))


def eventstream_to_sse(chunks: list[bytes]) -> None:
    decoder = EventStreamDecoder()
    for chunk in chunks:
        for message in decoder.feed(chunk):
            event = chunk_payload(message)
            encode_event(orjson.loads(event)["type"], event.decode())


def sse_parse(chunks: list[bytes]) -> None:
    parser = SseParser()
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()


def sse_to_eventstream(chunks: list[bytes]) -> None:
    parser = SseParser()
    for chunk in chunks:
        for event in parser.feed(chunk):
            encode_chunk(event.data.encode())


def per_message_us(fn: Callable[[list[bytes]], None], chunks: list[bytes], n: int) -> float:
    """Median over rounds of the time per message, in microseconds."""
    fn(chunks)  # warm-up
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        fn(chunks)
        samples.append((time.perf_counter_ns() - start) / n / 1000)
    return statistics.median(samples)


def run() -> tuple[list[list[str]], dict[str, str]]:
    events = anthropic_events()
    stream = b"".join(encode_chunk(e) for e in events)
    sse = b"".join(encode_event(orjson.loads(e)["type"], e.decode()) for e in events)
    per_message = [encode_chunk(e) for e in events]
    n = len(events)
    cases: list[tuple[str, Callable[[list[bytes]], None], list[bytes], list[bytes]]] = [
        ("decode (both CRCs)", decode_only, per_message, reads(stream, 4096)),
        ("decode + unwrap base64 JSON", decode_unwrap, per_message, reads(stream, 4096)),
        ("decode + re-encode (redaction)", decode_reencode, per_message, reads(stream, 4096)),
        (
            "event-stream -> SSE (cross-serving)",
            eventstream_to_sse,
            per_message,
            reads(stream, 4096),
        ),
        ("SSE parse (reference)", sse_parse, reads(sse, 200), reads(sse, 4096)),
        (
            "SSE -> event-stream (cross-serving)",
            sse_to_eventstream,
            reads(sse, 200),
            reads(sse, 4096),
        ),
    ]
    rows = []
    for name, fn, one_each, four_k in cases:
        rows.append(
            [name, f"{per_message_us(fn, one_each, n):.2f}", f"{per_message_us(fn, four_k, n):.2f}"]
        )
    facts = {"messages": str(n), "event-stream bytes": str(len(stream)), "SSE bytes": str(len(sse))}
    return rows, facts


def report(rows: list[list[str]], facts: dict[str, str]) -> str:
    header = ["step", "µs per message, one message per read", "µs per message, 4 KB reads"]
    return "\n".join(
        [
            "## AWS event-stream framing: cost per message",
            "",
            f"Command: `python bench/eventstream_bench.py`; Python {platform.python_version()}, "
            f"{facts['messages']} messages ({facts['event-stream bytes']} bytes as event-stream, "
            f"{facts['SSE bytes']} as SSE), median of {ROUNDS} rounds, one thread, no Envoy.",
            "A Bedrock answer's messages carry one Anthropic event each (base64 JSON inside a",
            "JSON payload, two CRC32s); SSE rows read the same events as `text/event-stream`",
            "(the SSE per-message reads are 200-byte network reads).",
            "",
            c.table(header, rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows, facts = run()
    text = report(rows, facts)
    print(text)
    if not args.no_write:
        c.write_section(RESULTS, "eventstream", text, "Benchmark results")


if __name__ == "__main__":
    main()
