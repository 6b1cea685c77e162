"""SigV4 signing cost: in the ext_proc (pure Python) vs Envoy's aws_request_signing filter.

1. In-process: the per-request CPU of `extproc.cloud.sigv4.sign` and of botocore's
   `SigV4Auth` for a 2 KB and a 117 KB (a real Claude Code request) JSON body.
2. Through Envoy: requests to a fake Bedrock that recomputes every signature (botocore as the
   oracle) via an Envoy with the `envoy.filters.http.aws_request_signing` filter (payload
   signed, not UNSIGNED-PAYLOAD: Bedrock needs the body hash) vs the same Envoy without
   the filter (the fake's check off), alternating rounds; the difference is the filter's cost.

    python bench/sigv4_bench.py [--requests 300] [--rounds 2]

Bounded: about 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _common import EnvoyProcess
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from yarl import URL

from extproc.cloud import sigv4
from tests.cloud_fakes import AwsIdentity, FakeBedrock
from tests.harness import free_port

URL_PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
KEY_ID, SECRET = "AKIABENCHKEY00000001", "bench-secret"


def body_of(size: int) -> bytes:
    text = "x" * max(0, size - 120)
    payload = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
    }
    return orjson.dumps(payload)


def in_process(sizes: list[int]) -> list[tuple[int, float, float]]:
    keys = sigv4.AwsKeys(KEY_ID, SECRET, "token")
    creds = ReadOnlyCredentials(KEY_ID, SECRET, "token")
    url = "https://bedrock-runtime.us-east-1.amazonaws.com" + URL_PATH
    rows = []
    for size in sizes:
        body = body_of(size)

        def ours(body: bytes = body) -> None:
            sigv4.sign(keys, "bedrock", "us-east-1", "POST", url, body)

        def boto(body: bytes = body) -> None:
            request = AWSRequest(method="POST", url=url, data=body, headers={"content-type": "a"})
            SigV4Auth(creds, "bedrock", "us-east-1").add_auth(request)

        n = 1000
        rows.append(
            (size, timeit.timeit(ours, number=n) / n * 1e6, timeit.timeit(boto, number=n) / n * 1e6)
        )
    return rows


def bootstrap(listen: int, upstream: int, admin: int, sign: bool) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if sign:
        filters.append(
            {
                "name": "envoy.filters.http.aws_request_signing",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http."
                    "aws_request_signing.v3.AwsRequestSigning",
                    "service_name": "bedrock",
                    "region": "us-east-1",
                    "use_unsigned_payload": False,
                },
            }
        )
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "http_filters": filters,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "bedrock"}}],
                }
            ]
        },
    }
    address = {"socket_address": {"address": "127.0.0.1", "port_value": listen}}
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": address,
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "bedrock",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "bedrock",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
            ],
        },
    }  # fmt: skip


async def run_round(port: int, body: bytes, n: int) -> list[float]:
    url = URL(f"http://127.0.0.1:{port}{URL_PATH}", encoded=True)
    times = []
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"status {answer.status}: {await answer.text()}")
            times.append((time.perf_counter() - start) * 1e3)
    return times


async def through_envoy(sizes: list[int], n: int, rounds: int) -> list[tuple[int, float, float]]:
    identity = AwsIdentity()
    identity.static(KEY_ID, SECRET)
    signed_fake, plain_fake = FakeBedrock(identity), FakeBedrock(identity, verify=False)
    await signed_fake.start()
    await plain_fake.start()
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    workdir = Path(tempfile.mkdtemp(prefix="sigv4-bench-"))
    ports = {"signed": free_port(), "plain": free_port()}
    envoys = [
        EnvoyProcess(
            name, bootstrap(ports[name], fake.port, free_port(), name == "signed"), workdir
        )
        for name, fake in (("signed", signed_fake), ("plain", plain_fake))
    ]
    for envoy in envoys:
        await asyncio.to_thread(envoy.start)
    rows = []
    try:
        for size in sizes:
            body = body_of(size)
            got: dict[str, list[float]] = {"signed": [], "plain": []}
            for _ in range(rounds):
                for name in ("plain", "signed"):
                    got[name] += await run_round(ports[name], body, n)
            rows.append((size, statistics.median(got["plain"]), statistics.median(got["signed"])))
        assert not signed_fake.refused, signed_fake.refused[:3]
        assert len(signed_fake.calls) == len(sizes) * rounds * n
    finally:
        for envoy in envoys:
            envoy.stop()
        await signed_fake.stop()
        await plain_fake.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sizes = [2_000, 117_000]
    print("| body | pure sigv4 (ext_proc) | botocore SigV4Auth |")
    print("| --- | --- | --- |")
    for size, ours, boto in in_process(sizes):
        print(f"| {size // 1000} KB | {ours:.0f} µs | {boto:.0f} µs |")
    rows = asyncio.run(through_envoy(sizes, args.requests, args.rounds))
    print()
    print("| body | Envoy, no signing (p50) | Envoy + aws_request_signing (p50) | filter adds |")
    print("| --- | --- | --- | --- |")
    for size, plain, signed in rows:
        added = (signed - plain) * 1e3
        print(f"| {size // 1000} KB | {plain:.2f} ms | {signed:.2f} ms | {added:.0f} µs |")


if __name__ == "__main__":
    main()
