"""The gateway's own CPU per request, in-process: no Envoy, no gRPC, no sockets.

Drives `extproc.server.ExternalProcessor.Process` with the four messages Envoy sends for a
2 KB non-streaming `POST /v1/messages` (request headers, request body, response headers,
a 2 KB JSON answer) through a fake servicer context, with every policy on: a gateway key,
an allow-list, the guard on the request and the answer, a cache miss (each prompt
differs), a budget and a rate limit in the memory store, the audit record to a file,
metrics. Reports process CPU time (time.process_time) per request over the best of
`--rounds` rounds, each of `-n` requests, after a warm-up; stream closes (settle, audit)
are awaited inside the timing.

To compare two commits of the gateway in one run (the machine is shared and noisy), give
each tree on its own PYTHONPATH and alternate:

    git worktree add /tmp/old a0ad70f
    for i in 1 2 3; do
      PYTHONPATH=/tmp/old .venv/bin/python bench/inproc_ab.py -n 2000
      PYTHONPATH=. .venv/bin/python bench/inproc_ab.py -n 2000
    done

`--profile FILE` writes a cProfile of one round (pstats format) instead of timing.

`--body 117kb` sends the recorded-shape 117 KB Claude Code request instead (the one
bench/anchor_bench.py uses, tests/data/claude_code_request.py), with a per-request token
in its last user turn: still a cache miss every request.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor

KEY = "gwk_bench_" + "s" * 43
MODEL = "claude-sonnet-4-5"


def config(audit_path: str, without: frozenset[str] = frozenset()) -> dict[str, Any]:
    """All policies on, less those named in `without` (guard, cache, budget, audit)."""
    data = _config(audit_path)
    if "guard" in without:
        del data["guard"]
    if "cache" in without:
        data["profiles"]["default"]["cache"]["enabled"] = False
    if "budget" in without:
        del data["budgets"], data["rate_limits"]
    if "audit" in without:
        data["audit"] = {"sink": "none"}
    return data


def _config(audit_path: str) -> dict[str, Any]:
    key_hash = "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    return {
        "providers": {
            "anthropic": {
                "api": "anthropic",
                "base_url": "http://127.0.0.1:9",  # never contacted
                "credential": {"value": "sk-ant-bench"},
            }
        },
        "auth": {"required": True, "keys": [{"id": "bench", "hash": key_hash, "team": "t"}]},
        "teams": {"t": {"models": ["claude-*"]}},
        "profiles": {"default": {"models": ["claude-*"], "cache": {"enabled": True}}},
        "guard": {"profiles": {"default": {}}},
        "budgets": {"rules": [{"scope": "key", "id": "*", "window": "daily", "usd": 1e6}]},
        "rate_limits": {"key": {"requests_per_minute": 10**8, "tokens_per_minute": 10**11}},
        "audit": {"sink": audit_path},
    }


def _headers(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=eos)


def _attributes(values: dict[str, Any]) -> dict[str, struct_pb2.Struct]:
    attributes = struct_pb2.Struct()
    attributes.update(values)
    return {"envoy.filters.http.ext_proc": attributes}


def small_body(i: int) -> bytes:
    """The 2 KB request `i` (its prompt differs: a cache miss)."""
    text = f"request {i}: " + "please review this code and explain it. " * 45
    body = {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": text}]}
    return orjson.dumps(body)


_PLACEHOLDER = b"Q" * 12


def large_bodies() -> Callable[[int], bytes]:
    """Request `i` in the recorded 117 KB Claude Code shape, as bench/anchor_bench.py builds
    it: `i` in its last user turn (where a new turn differs from the previous one)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)  # after PYTHONPATH: an A/B tree's own gateway wins
    from tests.data.claude_code_request import build_request

    document = build_request()
    document["stream"] = False
    block = document["messages"][-1]["content"][-1]
    block["text"] = f"Turn {_PLACEHOLDER.decode()}. " + block["text"]
    prefix, suffix = orjson.dumps(document).split(_PLACEHOLDER)
    return lambda i: prefix + f"{i:012d}".encode() + suffix


BODIES: dict[str, Callable[[], Callable[[int], bytes]]] = {
    "2kb": lambda: small_body,
    "117kb": large_bodies,
}


def messages(i: int, body_of: Callable[[int], bytes] = small_body) -> list[pb.ProcessingRequest]:
    """Envoy's four messages for request `i` (its body differs: a cache miss)."""
    answer = {
        "id": f"msg_{i}",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "fine. " * 330}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 480, "output_tokens": 400},
    }
    request_headers = {
        ":method": "POST",
        ":path": "/v1/messages",
        ":authority": "gateway",
        ":scheme": "http",
        "x-request-id": f"req-{i}",
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": KEY,
        "user-agent": "claude-cli/2.0 (external, cli)",
        "x-forwarded-for": "127.0.0.1",
    }
    response_headers = {":status": "200", "content-type": "application/json"}
    return [
        pb.ProcessingRequest(
            request_headers=_headers(request_headers),
            attributes=_attributes({"xds.route_name": "default"}),
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body_of(i), end_of_stream=True)),
        pb.ProcessingRequest(
            response_headers=_headers(response_headers),
            attributes=_attributes({"response.code_details": "via_upstream"}),
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=orjson.dumps(answer), end_of_stream=True)
        ),
    ]


class Context:
    """The servicer side of the RPC, as much of it as `Process` uses."""

    def __init__(self) -> None:
        self.replies: list[pb.ProcessingResponse] = []

    async def write(self, response: pb.ProcessingResponse) -> None:
        self.replies.append(response)

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def _iterate(requests: list[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
    for request in requests:
        yield request


async def one(
    servicer: ExternalProcessor, gw: Gateway, requests: list[pb.ProcessingRequest]
) -> None:
    context = Context()
    await servicer.Process(_iterate(requests), context)
    while gw.pending:  # the stream's close (settle, audit) runs as a task
        await asyncio.gather(*list(gw.pending))
    if len(context.replies) != 4 or context.replies[1].HasField("immediate_response"):
        raise SystemExit(f"unexpected replies: {context.replies!r}"[:2000])


def _instrument(state: str) -> None:
    """Turn callgrind's instrumentation of this process on or off (blocks: between rounds)."""
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True)


async def rounds(
    n: int,
    count: int,
    profile: str | None,
    callgrind: bool,
    without: frozenset[str],
    body_of: Callable[[int], bytes] = small_body,
) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        data = config(os.path.join(tmp, "audit.jsonl"), without)
        gw = Gateway.from_config(parse_config(data))
        servicer = ExternalProcessor(gw)
        batches = [[messages(r * n + i, body_of) for i in range(n)] for r in range(count + 1)]
        for requests in batches[0][: min(n, 300)]:  # warm-up
            await one(servicer, gw, requests)
        if callgrind:
            # Under `valgrind --tool=callgrind --instr-atstart=no`: count instructions
            # (deterministic, unlike CPU time on a shared machine) for one round only.
            _instrument("on")
            for requests in batches[1]:
                await one(servicer, gw, requests)
            _instrument("off")
            return []
        if profile is not None:
            profiler = cProfile.Profile()
            profiler.enable()
            for requests in batches[1]:
                await one(servicer, gw, requests)
            profiler.disable()
            profiler.dump_stats(profile)
            return []
        per_request = []
        for batch in batches[1:]:
            started = time.process_time()
            for requests in batch:
                await one(servicer, gw, requests)
            per_request.append((time.process_time() - started) / n * 1e6)
        return per_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write a cProfile of one round here")
    parser.add_argument(
        "--without", default="", help="policies to turn off: guard,cache,budget,audit (comma list)"
    )
    parser.add_argument(
        "--body", choices=sorted(BODIES), default="2kb", help="the request: 2kb or 117kb"
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="instrument one round (run under callgrind)"
    )
    args = parser.parse_args()
    import extproc

    without = frozenset(filter(None, args.without.split(",")))
    body_of = BODIES[args.body]()
    results = asyncio.run(
        rounds(args.n, args.rounds, args.profile, args.callgrind, without, body_of)
    )
    if results:
        where = os.path.dirname(os.path.dirname(os.path.abspath(extproc.__file__)))
        shown = " ".join(f"{r:.1f}" for r in results)
        median = sorted(results)[len(results) // 2]
        print(
            f"{where}: best {min(results):.1f}, median {median:.1f} µs CPU/request "
            f"(rounds: {shown})",
            flush=True,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
