"""What the request-side policies cost per request, measured in-process (no sockets).

The servicer is fed the request-headers and request-body `ProcessingRequest`s of a
`/v1/messages` call, exactly as Envoy sends them, under configurations that add one
policy at a time, and the wall time of those two phases is sampled many times:

- `passthrough`: no gateway keys, default profile (the floor: parsing, routing headers);
- `identity+allow+route`: a gateway key (config-declared), team and tier allow-lists
  and a per-model provider route, for a model that needs no rewrite;
- `+model rewrite`: the same, asking for an alias that the tier maps to another model,
  so the body is re-serialised with the served model;
- `+cache key (miss)`: the same plus a cache-enabled route: key computation, a store
  lookup and single-flight lock on the in-memory store, and the hygiene shape;
- `cache hit`: the answer is served from the cache (SSE unfolded into the reply);
- `all policies`: the same plus the guard (redaction and injection scoring, default
  profile) and a USD budget (token estimate, reservation): the issue-17 shape, the
  same request again each sample;
- `all policies, next turn`: each sample is the recorded conversation plus a new turn
  (an assistant tool call and a fresh 4 KB tool result): what a session's next request
  costs once its history has been seen.

Each for a 2 KB body and a 117 KB Claude Code-sized body. Targets: identity, allow-list
and routing add <= 0.2 ms p50 (issue 3); cache key computation cost is reported for
the cache issue. Run: `python bench/policy_bench.py [--quick]`; results go to
bench/RESULTS.md (section "policy").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from _common import ROOT, load_average, machine_facts, table, write_section
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.policies.auth import hash_key, new_key
from extproc.server import ExternalProcessor
from extproc.telemetry.audit import NullSink
from extproc.telemetry.metrics import Metrics
from tests.data.claude_code_request import build_request

KEY = new_key("bench")
PROVIDERS = {
    "anthropic": {
        "api": "anthropic",
        "base_url": "https://api.anthropic.com",
        "credential": {"value": "sk"},
    },
    "bulk": {
        "api": "anthropic",
        "base_url": "https://bulk.internal",
        "credential": {"value": "sk"},
    },
}
POLICY: dict[str, Any] = {
    "auth": {"required": True, "keys": [{"id": "bench", "hash": hash_key(KEY), "team": "ml"}]},
    "teams": {"ml": {"tier": "pro", "models": ["claude-*"]}},
    "tiers": {"pro": {"models": ["claude-*"], "map": {"claude-opus-*": "claude-sonnet-4-6"}}},
    "models": {
        "aliases": {"opus": "claude-opus-4-8"},
        "routes": [{"match": "claude-3-*", "provider": "bulk"}],
    },
}
CACHED = {**POLICY, "profiles": {"default": {"cache": {"enabled": True}}}}
ALL = {
    **CACHED,
    "guard": {},
    "budgets": {"rules": [{"scope": "team", "id": "*", "window": "daily", "usd": 1e9}]},
}


class _Context:
    def __init__(self) -> None:
        self.written: list[pb.ProcessingResponse] = []

    async def write(self, response: pb.ProcessingResponse) -> None:
        self.written.append(response)


def _messages(body: bytes, key: str) -> list[pb.ProcessingRequest]:
    pairs = {
        ":method": "POST",
        ":path": "/v1/messages",
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": key,
        "content-length": str(len(body)),
        "x-request-id": "bench",
    }
    headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers))
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]


async def _iterate(
    messages: Sequence[pb.ProcessingRequest],
) -> AsyncIterator[pb.ProcessingRequest]:
    for message in messages:
        yield message


CPU: list[float] = []  # the loop thread's CPU time of each sample, beside its wall time


async def _one(servicer: ExternalProcessor, messages: Sequence[pb.ProcessingRequest]) -> float:
    started, cpu = time.perf_counter(), time.thread_time()
    await servicer.Process(_iterate(messages), _Context())
    await servicer.gateway.settle_pending(10)  # the stream's settle and audit task
    CPU.append(time.thread_time() - cpu)
    return time.perf_counter() - started


def _next_turns(body: bytes, count: int) -> list[bytes]:
    """The conversation in `body`, each with its own new turn: a tool call and its
    result (4 KB of fresh text, not only in its digits: the cache's hygiene would take
    those turns for near misses of each other)."""
    request = orjson.loads(body)
    turns = []
    for i in range(count):
        word = "".join(chr(ord("g") + int(d)) for d in f"{i:04d}")  # not only digits
        result = "".join(f"{n:6d}  {word} line {n} of the new file read\n" for n in range(100))
        call = {"type": "tool_use", "id": f"toolu_{i:08d}", "name": "Read", "input": {"f": word}}
        reply = {"type": "tool_result", "tool_use_id": f"toolu_{i:08d}", "content": result}
        messages = [
            *request["messages"],
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [reply]},
        ]
        turns.append(orjson.dumps({**request, "messages": messages}))
    return turns


async def _sample_turns(config: dict[str, Any], body: bytes, runs: int) -> list[float]:
    """Samples of a new turn each, after the recorded conversation was seen."""
    gateway = Gateway.from_config(
        parse_config({"providers": PROVIDERS, **config}), metrics=Metrics(), audit=NullSink()
    )
    servicer = ExternalProcessor(gateway)
    for _ in range(min(200, runs)):
        await _one(servicer, _messages(body, KEY))
    turns = [_messages(turn, KEY) for turn in _next_turns(body, runs)]
    samples = [await _one(servicer, messages) for messages in turns]
    await gateway.settle_pending(10)
    await gateway.close()
    return samples


async def _sample(config: dict[str, Any], body: bytes, runs: int, prime: bool) -> list[float]:
    gateway = Gateway.from_config(
        parse_config({"providers": PROVIDERS, **config}), metrics=Metrics(), audit=NullSink()
    )
    servicer = ExternalProcessor(gateway)
    # Pass-through callers bring their own provider key; the others a gateway key.
    messages = _messages(body, KEY if config else "sk-ant-callers-own-key")
    if prime:  # store an answer so every sample is a hit
        stream_answer = {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [{"type": "text", "text": "ok " * 200}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
        await _prime(servicer, messages, stream_answer)
    for _ in range(min(200, runs)):
        await _one(servicer, messages)
    samples = [await _one(servicer, messages) for _ in range(runs)]
    replies = _Context()
    await servicer.Process(_iterate(messages), replies)
    if replies.written[-1].HasField("immediate_response") and not prime:
        raise SystemExit(f"the benchmark request was refused: {replies.written[-1]}")
    await gateway.settle_pending(10)
    await gateway.close()
    return samples


async def _prime(
    servicer: ExternalProcessor, messages: Sequence[pb.ProcessingRequest], answer: dict[str, Any]
) -> None:
    status = [
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
    ]
    reply = [
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=status))
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=orjson.dumps(answer), end_of_stream=True)
        ),
    ]

    async def iterate() -> AsyncIterator[pb.ProcessingRequest]:
        for message in [*messages, *reply]:
            yield message

    await servicer.Process(iterate(), _Context())
    await servicer.gateway.settle_pending(10)  # the answer is stored by the close task


def _body(size: int, model: str) -> bytes:
    if size > 100_000:
        request = build_request()
    else:
        request = {
            "model": "opus",
            "max_tokens": 1024,
            "stream": True,
            "messages": [{"role": "user", "content": "Review this change please. " * 70}],
        }
    request["model"] = model
    return orjson.dumps(request)


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples, smoke run")
    parser.add_argument("--cases", help="case names separated by ';' (default: all)")
    args = parser.parse_args()
    runs = 300 if args.quick else 3000
    cases = [
        ("passthrough", {}, False, "opus"),
        ("identity+allow+route", POLICY, False, "claude-sonnet-4-6"),
        ("+model rewrite", POLICY, False, "opus"),
        ("+cache key (miss)", CACHED, False, "opus"),
        ("cache hit", CACHED, True, "opus"),
        ("all policies", ALL, False, "opus"),
        ("all policies, next turn", ALL, False, "opus"),
    ]
    if args.cases:
        wanted = args.cases.split(";")
        cases = [c for c in cases if c[0] in wanted or c[0] == "passthrough"]
    rows: list[list[str]] = []
    base: dict[str, float] = {}
    for size_name, size in (("2 KB", 2048), ("117 KB", 117 * 1024)):
        for name, config, prime, model in cases:
            body = _body(size, model)
            hygiene = config is CACHED or config is ALL
            config = {**config, "cache": {"hygiene": True}} if hygiene else config
            CPU.clear()
            if config and "next turn" in name:
                samples = asyncio.run(_sample_turns(config, body, runs))
            else:
                samples = asyncio.run(_sample(config, body, runs, prime))
            p50 = _ms(samples, 0.5)
            cpu = _ms(CPU[-len(samples) :], 0.5)
            base.setdefault(size_name, p50)
            rows.append(
                [
                    size_name,
                    f"{len(body):,}",
                    name,
                    f"{p50:.3f}",
                    f"{_ms(samples, 0.99):.3f}",
                    f"{p50 - base[size_name]:+.3f}",
                    f"{statistics.mean(samples) * 1000:.3f}",
                    f"{cpu:.3f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    facts = machine_facts({})
    text = "\n".join(
        [
            "## Request-side policy cost (in-process)",
            "",
            f"Command: `python bench/policy_bench.py{' --quick' if args.quick else ''}`; "
            f"{runs} samples per case after warm-up; {facts['CPU']}, "
            f"{facts['cores (nproc)']} cores, "
            f"Python {facts['Python']}, commit {facts['extproc commit']}, load {load_average()}.",
            "Time of the request-headers + request-body phases through the servicer (protobuf in,",
            "protobuf out, in-memory store), without Envoy or the network; `p50 CPU` is the",
            "loop thread's CPU time per request (`time.thread_time`), which a busy machine",
            "stretches less than wall time.",
            "",
            table(
                [
                    "body",
                    "bytes",
                    "case",
                    "p50 ms",
                    "p99 ms",
                    "Δp50 vs passthrough",
                    "mean ms",
                    "p50 CPU ms",
                ],
                rows,
            ),
        ]
    )
    write_section(ROOT / "bench" / "RESULTS.md", "policy", text, "Benchmark results")


if __name__ == "__main__":
    main()
