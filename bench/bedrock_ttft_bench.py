"""Time to first token added by the gateway in Claude Code's Bedrock mode, vs direct.

One fake Bedrock runtime (tests/cloud_fakes.py `FakeBedrock`: it recomputes every SigV4
signature, then streams `message_start`, `content_block_start`, text deltas and the end
as AWS event-stream frames) is reached three ways, samples alternating between them:

- *direct*: a client that signs itself (SigV4 before the timer starts), as a Bedrock
  client with AWS credentials would;
- *gateway, Bedrock mode*: `POST /bedrock/model/{id}/invoke-with-response-stream` with a
  gateway key through Envoy + the ext_proc, which authenticates, applies the model policy,
  guard and budget, signs with its own AWS identity, decodes the answer's frames for its
  policies and re-encodes them for the client;
- *gateway, Anthropic mode*: `POST /v1/messages` (stream) to the same Bedrock provider:
  the frames are re-emitted as SSE (what an `ANTHROPIC_BASE_URL` client sees).

TTFT is timed from sending a 2 KB streamed request to receiving the first
`content_block_delta` (decoded from the frames, or found in the SSE bytes), one
keep-alive connection per path (each answer is read to its end). The fake runs in this
process on its own thread, so the client and the fake share a GIL: absolute numbers
include that; compare the paths.

    python bench/bedrock_ttft_bench.py            # ~40 s, writes the bedrock-ttft section
    python bench/bedrock_ttft_bench.py --quick    # ~15 s, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import _common as c
import httpx
import orjson

from extproc.apis.eventstream import BedrockEventParser
from extproc.cloud.sigv4 import AwsKeys, sign
from extproc.policies.auth import hash_key, new_key
from tests.cloud_fakes import AwsIdentity, FakeBedrock, serving
from tests.harness import Stack

DIRECT, BEDROCK, ANTHROPIC = (
    "direct (client signs)",
    "gateway, Bedrock mode",
    "gateway, Anthropic mode",
)
KEY_ID, SECRET = "AKIABENCHKEY00000001", "bench-secret"
PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
RESULTS = c.ROOT / "bench" / "RESULTS.md"
SECTION = "bedrock-ttft"
TIME_LIMIT = 120
PROMPT = "x" * 2000


def gateway_config(bedrock_url: str, key: str) -> dict[str, Any]:
    port = c.free_port
    return {
        "listen": f"127.0.0.1:{port()}",
        "grpc_listen": f"127.0.0.1:{port()}",
        "metrics_listen": None,
        "envoy": {"admin": f"127.0.0.1:{port()}"},
        "audit": {"sink": "none"},
        "providers": {
            "bedrock": {
                "api": "bedrock",
                "base_url": bedrock_url,
                "cloud": {
                    "kind": "bedrock",
                    "region": "us-east-1",
                    "models": {"claude-sonnet-4-5": PROFILE},
                },
            }
        },
        "models": {
            "aliases": {PROFILE: "claude-sonnet-4-5"},
            "routes": [{"match": "*", "provider": "bedrock"}],
        },
        "auth": {"required": True, "keys": [{"id": "bench", "hash": hash_key(key)}]},
        "guard": {},
    }


def _first_delta_in_frames(response: httpx.Response, started: float) -> float:
    """ms to the first content_block_delta frame; the rest is read (the connection is reused)."""
    parser, ttft = BedrockEventParser(), None
    for chunk in response.iter_raw():
        if ttft is None and any(e.event == "content_block_delta" for e in parser.feed(chunk)):
            ttft = (time.perf_counter() - started) * 1000
    if ttft is None:
        raise c.BenchError("the event stream had no content_block_delta")
    return ttft


def _first_delta_in_sse(response: httpx.Response, started: float) -> float:
    seen, ttft = b"", None
    for chunk in response.iter_raw():
        seen = seen[-32:] + chunk
        if ttft is None and b"content_block_delta" in seen:
            ttft = (time.perf_counter() - started) * 1000
    if ttft is None:
        raise c.BenchError("the SSE stream had no content_block_delta")
    return ttft


Probe = Callable[[], float]


def direct_probe(client: httpx.Client, url: str) -> Probe:
    path = f"/model/{quote(PROFILE, safe='')}/invoke-with-response-stream"  # as AWS SDKs send it
    body = orjson.dumps(
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": _messages()}
    )
    keys = AwsKeys(KEY_ID, SECRET, None)

    def once() -> float:
        headers = sign(keys, "bedrock", "us-east-1", "POST", url + path, body)
        headers["content-type"] = "application/json"  # signed: it must be sent as signed
        started = time.perf_counter()
        with client.stream("POST", url + path, content=body, headers=headers) as response:
            if response.status_code != 200:
                raise c.BenchError(f"direct: {response.status_code} {response.read()[:300]!r}")
            return _first_delta_in_frames(response, started)

    return once


def gateway_probe(client: httpx.Client, url: str, key: str, bedrock_mode: bool) -> Probe:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    payload: dict[str, Any] = {"max_tokens": 64, "messages": _messages()}
    if bedrock_mode:
        path = f"{url}/bedrock/model/{PROFILE}/invoke-with-response-stream"
        payload["anthropic_version"] = "bedrock-2023-05-31"
    else:
        path = f"{url}/v1/messages"
        payload |= {"model": "claude-sonnet-4-5", "stream": True}
        headers["anthropic-version"] = "2023-06-01"
    body = orjson.dumps(payload)
    reader = _first_delta_in_frames if bedrock_mode else _first_delta_in_sse

    def once() -> float:
        started = time.perf_counter()
        with client.stream("POST", path, content=body, headers=headers) as response:
            if response.status_code != 200:
                raise c.BenchError(f"{path}: {response.status_code} {response.read()[:200]!r}")
            return reader(response, started)

    return once


def _messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPT}]


@contextlib.contextmanager
def rig() -> Iterator[tuple[str, str, str]]:
    """(fake Bedrock URL, gateway URL, gateway key); everything stops on exit."""
    identity = AwsIdentity()
    identity.static(KEY_ID, SECRET)
    bedrock = FakeBedrock(identity)
    key = new_key("bench")
    with serving(bedrock):
        stack = Stack(gateway_config(bedrock.url, key))
        saved = dict(os.environ)
        os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        try:
            stack.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            yield bedrock.url, stack.url, key
        finally:
            stack.close()


def measure(samples: int, budget: float) -> dict[str, list[float]]:
    with rig() as (bedrock_url, gateway_url, key), httpx.Client(timeout=30) as client:
        probes = {
            DIRECT: direct_probe(client, bedrock_url),
            BEDROCK: gateway_probe(client, gateway_url, key, bedrock_mode=True),
            ANTHROPIC: gateway_probe(client, gateway_url, key, bedrock_mode=False),
        }
        for _ in range(30):  # warm-up: connections, caches, the credential fetch
            for probe in probes.values():
                probe()
        out: dict[str, list[float]] = {name: [] for name in probes}
        deadline = time.monotonic() + budget
        while len(out[DIRECT]) < samples and time.monotonic() < deadline:
            for name, probe in probes.items():
                out[name].append(probe())
        return out


def report(
    ttft: dict[str, list[float]], command: str, facts: dict[str, str], loads: tuple[str, str]
) -> str:
    direct = c.percentile(ttft[DIRECT], 50)
    rows = [
        [
            name,
            str(len(samples)),
            f"{c.percentile(samples, 50):.2f}",
            f"{c.percentile(samples, 90):.2f}",
            f"{c.percentile(samples, 99):.2f}",
            f"{c.percentile(samples, 50) - direct:+.2f}",
        ]
        for name, samples in ttft.items()
    ]
    header = ["path", "samples", "TTFT p50 ms", "p90 ms", "p99 ms", "added p50 ms"]
    return "\n".join(
        [
            "## Time to first token in Bedrock mode, through the gateway vs direct",
            "",
            f"Command: `{command}`. A 2 KB streamed request to the fake Bedrock (it checks",
            "every SigV4 signature), alternating paths, one keep-alive connection each; the",
            "gateway runs a guard profile (output screening on) and gateway-key auth.",
            "",
            c.table(header, rows),
            "",
            c.machine_table(facts, *loads),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--budget", type=float, default=35.0, help="seconds of sampling")
    parser.add_argument("--quick", action="store_true", help="short run, print only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.samples, args.budget = 60, 10.0
    command = ("python bench/bedrock_ttft_bench.py " + shlex.join(sys.argv[1:])).strip()

    def work() -> int:
        facts, before = c.machine_facts({}), c.load_average()
        ttft = measure(args.samples, args.budget)
        text = report(ttft, command, facts, (before, c.load_average()))
        print(text)
        if not args.quick:
            c.write_section(RESULTS, SECTION, text, "Benchmark results")
        return 0

    result = c.guarded("bedrock_ttft_bench", TIME_LIMIT, work)
    return result


if __name__ == "__main__":
    sys.exit(main())
