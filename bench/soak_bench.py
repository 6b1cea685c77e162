"""Does the ext_proc server's memory stay flat under sustained load? RSS per 100k requests.

A load driver in this process plays Envoy's side of the ext_proc protocol directly
(no Envoy, no wrk: only the server under test is measured): C concurrent gRPC streams
on one HTTP/2 channel, each a complete request (request headers, a 2 KB Anthropic
body, 200 JSON response headers, the JSON answer with usage). It sends N requests to

    (a) `extproc serve`, the memory store, a key budget and a pipeline budget
        (so every request reserves and settles), audit records to a file; and
    (b) a null ext_proc: the same gRPC transport, limits and event loop that
        answers each phase with an empty reply through `context.write`, as the real
        servicer does, i.e. the floor of gRPC itself under the same load;

and samples each server's RSS (/proc/PID/status VmRSS) every `--every` requests after a
warm-up (past the memory store's 10,000 finished reservation records). Growth is the
least-squares slope of RSS over requests, reported per 100k requests; a server that
leaks grows linearly, one that does not stays within noise.

Each stream ends with a half-close, as Envoy ends it with the runtime flag
`envoy.reloadable_features.ext_proc_graceful_grpc_close` (not set in the shipped
bootstraps: see bench/RESULTS.md); `--reset` cancels it instead (RST_STREAM), as the
shipped Envoy does.
A grpc.aio server leaks native memory for every RPC reset under it (grpc/grpc#43360),
the null server as much as the gateway: that was the ~120 B per request of issue 11.

    python bench/soak_bench.py                   # 16k requests each, writes RESULTS.md
    python bench/soak_bench.py --reset           # the same with reset streams (its own section)
    python bench/soak_bench.py --requests 100000 # the issue's soak (~5 min on 2 cores)
    python bench/soak_bench.py --no-write        # print only

Every process it starts is stopped on exit, Ctrl-C or SIGTERM, and dies with the script.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as c
import grpc
import orjson
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from extproc import supervisor
from extproc.config import HostPort
from extproc.policies.auth import hash_key, new_key

TIME_LIMIT = 600
RESULTS = c.ROOT / "bench" / "RESULTS.md"
KEY = new_key("soak")
BODY = orjson.dumps(
    {
        "model": "claude-opus-4-8",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "x" * 2000}],
    }
)
ANSWER = orjson.dumps(
    {
        "id": "msg_soak",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-8",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 500, "output_tokens": 1},
    }
)


# -- the servers ------------------------------------------------------------------------


class NullWriter(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Empty replies through `context.write`, like extproc.server.ExternalProcessor."""

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> None:
        async for request in requests:
            response = pb.ProcessingResponse()
            getattr(response, request.WhichOneof("request")).SetInParent()
            await context.write(response)


def serve_null(port: int) -> None:
    c.serve_ext_proc(port, NullWriter())


def gateway_config(port: int, workdir: Path, budgets: bool = True) -> dict[str, Any]:
    config: dict[str, Any] = {
        "grpc_listen": f"127.0.0.1:{port}",
        "metrics_listen": f"127.0.0.1:{c.free_port()}",
        "audit": {"sink": os.environ.get("SOAK_AUDIT") or str(workdir / "audit.jsonl")},
        "providers": {
            "anthropic": {
                "api": "anthropic",
                "base_url": "http://127.0.0.1:9",
                "credential": {"value": "sk-soak"},
            }
        },
        "auth": {"required": True, "keys": [{"id": "soak", "hash": hash_key(KEY), "team": "t"}]},
        "budgets": {
            "rules": [
                {"scope": "key", "window": "daily", "usd": 1_000_000},
                {"scope": "pipeline", "window": "daily", "usd": 1_000_000},
            ]
        },
    }
    if not budgets:
        del config["budgets"]
    return config


def start_server(
    kind: str, workdir: Path, budgets: bool = True
) -> tuple[subprocess.Popen[bytes], HostPort]:
    port = c.free_port()
    log = (workdir / f"{kind}.log").open("ab")
    if kind == "extproc":
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(gateway_config(port, workdir, budgets)), encoding="utf-8")
        command = [sys.executable, "-m", "extproc", "--log-level", "warning", "serve"]
        command += ["--config", str(path)]
    else:
        command = [sys.executable, __file__, "--serve-null", str(port)]
    process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
    address = HostPort(host="127.0.0.1", port=port)
    if not supervisor.wait_grpc_serving(address, 30) and not c.wait_port(port, process, 30):
        c.stop_all([process])
        raise c.BenchError(f"{kind} did not start:\n{(workdir / f'{kind}.log').read_text()}")
    return process, address


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise c.BenchError(f"no VmRSS for {pid}")


# -- the driver -------------------------------------------------------------------------


def _headers(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=eos)


def _attributes() -> dict[str, struct_pb2.Struct]:
    """The request attributes Envoy sends with the headers (route name and metadata)."""
    values = struct_pb2.Struct()
    metadata = 'filter_metadata { key: "extproc" value { fields { key: "profile" '
    metadata += 'value { string_value: "default" } } } }'
    values.update({"xds.route_name": "anthropic", "xds.route_metadata": metadata})
    return {"envoy.filters.http.ext_proc": values}


ATTRIBUTES = _attributes()


def one_request(number: int) -> list[pb.ProcessingRequest]:
    request = {
        ":method": "POST",
        ":path": "/v1/messages",
        "x-request-id": f"soak-{number}",
        "x-api-key": KEY,
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "x-ci-pipeline-id": "nightly",
    }
    response = {":status": "200", "content-type": "application/json"}
    return [
        pb.ProcessingRequest(request_headers=_headers(request), attributes=ATTRIBUTES),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True)),
        pb.ProcessingRequest(response_headers=_headers(response)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=ANSWER, end_of_stream=True)),
    ]


async def _exchange(stub: Any, number: int, reset: bool = False) -> None:
    """One request as Envoy sends it: the next phase only after the previous reply; then
    a half-close (Envoy with ext_proc_graceful_grpc_close) or, with `reset`, a cancel
    (RST_STREAM, what Envoy does without it)."""
    queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        while (item := await queue.get()) is not None:
            yield item

    call = stub.Process(requests())
    for message in one_request(number):
        await queue.put(message)
        reply = await call.read()
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise c.BenchError("the server ended a stream early")
        if reply.HasField("immediate_response"):
            raise c.BenchError(f"refused: {reply.immediate_response.body[:200]!r}")
    if reset:
        call.cancel()
        return
    await queue.put(None)
    await call.code()


@dataclass(frozen=True)
class Soak:
    kind: str
    requests: int
    seconds: float
    samples: list[tuple[int, int]]  # (requests done, RSS bytes)

    @property
    def per_100k(self) -> float:
        """Least-squares RSS growth, bytes per 100k requests."""
        xs = [float(n) for n, _ in self.samples]
        ys = [float(r) for _, r in self.samples]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
        return slope * 100_000


async def drive(
    address: HostPort,
    pid: int,
    total: int,
    warmup: int,
    every: int,
    concurrency: int,
    reset: bool = False,
) -> list[tuple[int, int]]:
    samples: list[tuple[int, int]] = []
    async with grpc.aio.insecure_channel(str(address)) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        done = 0
        while done < warmup + total:
            batch = min(every, warmup + total - done)
            numbers = range(done, done + batch)
            for start in range(0, batch, concurrency):
                chunk = numbers[start : start + concurrency]
                await asyncio.gather(*(_exchange(stub, n, reset) for n in chunk))
            done += batch
            if done >= warmup:
                samples.append((done - warmup, rss_bytes(pid)))
    return samples


def soak(kind: str, args: argparse.Namespace, workdir: Path) -> Soak:
    process, address = start_server(kind, workdir, not args.no_budgets)
    try:
        started = time.monotonic()
        run = drive(
            address,
            process.pid,
            args.requests,
            args.warmup,
            args.every,
            args.concurrency,
            args.reset,
        )
        samples = asyncio.run(run)
        name = f"{kind}, client resets" if args.reset else kind
        return Soak(name, args.requests, time.monotonic() - started, samples)
    finally:
        c.stop_all([process])


# -- report -----------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}"


def render(soaks: Sequence[Soak], args: argparse.Namespace, facts: dict[str, str]) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for s in soaks:
        first, last = s.samples[0][1], s.samples[-1][1]
        rows.append(
            [
                s.kind,
                f"{s.requests:,}",
                f"{s.requests / s.seconds:,.0f}",
                _mb(first),
                _mb(last),
                f"{s.per_100k / 1e6:+.2f}",
                f"{s.per_100k / 100_000:+.0f}",
            ]
        )
    header = ["server", "requests", "req/s", "RSS after warm-up MB", "RSS at end MB"]
    header += ["growth MB / 100k", "B / request"]
    command = "python bench/soak_bench.py " + " ".join(sys.argv[1:])
    return "\n".join(
        [
            "## Soak: ext_proc RSS under sustained load (soak_bench.py"
            + (", streams reset by the client)" if args.reset else ")"),
            "",
            f"{when}, `{command.strip()}`: {args.concurrency} concurrent streams on one "
            f"channel, {args.warmup:,} warm-up requests, RSS sampled every {args.every:,}.",
            "",
            c.table(header, rows),
            "",
            c.table(["machine", ""], [[k, v] for k, v in facts.items()]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16_000)
    # Past the memory store's 10,000 finished reservation records, so their bound shows.
    parser.add_argument("--warmup", type=int, default=11_000)
    parser.add_argument("--every", type=int, default=2_500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--servers", default="extproc,null")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--reset",
        action="store_true",
        help="cancel each stream after the last reply, as Envoy does without "
        "ext_proc_graceful_grpc_close (default: half-close)",
    )
    parser.add_argument(
        "--no-budgets", action="store_true", help="extproc without budget rules (no reservations)"
    )
    parser.add_argument("--serve-null", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_null:
        serve_null(args.serve_null)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="soak-bench-"))

    def work() -> list[Soak]:
        return [soak(kind, args, workdir) for kind in args.servers.split(",")]

    facts = {
        "cores": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "load average before": c.load_average(),
    }
    output = None if args.no_write else RESULTS
    return c.run_and_report(
        "soak_bench",
        TIME_LIMIT,
        work,
        lambda s: render(s, args, facts),
        output,
        "soak-bench-reset" if args.reset else "soak-bench",
    )


if __name__ == "__main__":
    raise SystemExit(main())
