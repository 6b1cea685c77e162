"""What OpenTelemetry export adds per request on the hot path, measured in-process.

The servicer is fed a whole streamed `/v1/messages` call (request headers and body,
response headers, three SSE chunks, then the stream's close, which writes the audit
record and metrics and ends the span) under three configurations:

- `otel off`: no `telemetry.otel` (the default);
- `otel on`: traces and metrics exported over OTLP/gRPC to a loopback receiver (a child
  process, so its CPU is not counted), every request sampled;
- `otel on, sample_ratio 0`: metrics only: no caller `traceparent`, so no span is
  recorded (a context is still propagated). The other cases send a sampled `traceparent`.

Per request it records the CPU time of the event-loop thread (`time.thread_time`): that
is the hot path, where span ids are chosen and the finished record is sent to the
telemetry process. That process (the SDK: metrics, spans, OTLP export) runs beside the
gateway; the CPU per request of both processes together is reported too. Cases alternate in
rounds, each round starting with a different case, so a busy machine affects each alike.
Target (issue 16): <= 0.1 ms CPU per request on the hot path.
Run: `python bench/telemetry_bench.py [--quick]`; results go to bench/RESULTS.md
(section "telemetry").
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from _common import ROOT, load_average, machine_facts, table, write_section
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.telemetry.audit import NullSink
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.otel import OtelProcess

_CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = orjson.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "stream": True,
        "messages": [{"role": "user", "content": "Review this change please. " * 70}],
    }
)
EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-sonnet-4-5",'
    b'"usage":{"input_tokens":480,"output_tokens":1}}}\n\nevent: content_block_start\n'
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Looks good to me."}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":42}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n',
]


def _headers(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=eos)


def _script(traceparent: bool) -> list[pb.ProcessingRequest]:
    request = {
        ":method": "POST",
        ":path": "/v1/messages",
        "content-type": "application/json",
        "x-api-key": "sk-ant-caller",
    }
    if traceparent:  # a sampled caller: its decision is followed whatever sample_ratio says
        request["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = {":status": "200", "content-type": "text/event-stream"}
    script = [
        pb.ProcessingRequest(request_headers=_headers(request)),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True)),
        pb.ProcessingRequest(response_headers=_headers(response)),
    ]
    for i, chunk in enumerate(EVENTS):
        body = pb.HttpBody(body=chunk, end_of_stream=i == len(EVENTS) - 1)
        script.append(pb.ProcessingRequest(response_body=body))
    return script


class _Context:
    async def write(self, response: pb.ProcessingResponse) -> None:
        return None


async def _iterate(messages: Sequence[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
    for message in messages:
        yield message


def _gateway(otel: dict[str, Any] | None) -> Gateway:
    data: dict[str, Any] = {
        "providers": {"anthropic": {"api": "anthropic", "base_url": "https://api.anthropic.com"}}
    }
    if otel is not None:
        data["telemetry"] = {"otel": otel}
    return Gateway.from_config(parse_config(data), metrics=Metrics(), audit=NullSink())


async def _round(gateway: Gateway, runs: int) -> list[float]:
    script = _script(traceparent=gateway.config.telemetry.otel is None or _sampled(gateway))
    servicer = ExternalProcessor(gateway)
    context = _Context()
    samples = []
    for _ in range(runs):
        began = time.thread_time()
        await servicer.Process(_iterate(script), context)
        await gateway.settle_pending(10)  # the stream's settle and audit task
        samples.append(time.thread_time() - began)
    return samples


def _sampled(gateway: Gateway) -> bool:
    otel = gateway.config.telemetry.otel
    return otel is not None and otel.sample_ratio > 0


def _recorded(gateway: Gateway) -> None:
    otel = gateway.otel
    if isinstance(otel, OtelProcess):
        otel.force_flush()


def _telemetry_cpu(gateway: Gateway) -> float:
    """CPU seconds the gateway's telemetry process has used (0 with OTel off)."""
    otel = gateway.otel
    if not isinstance(otel, OtelProcess):
        return 0.0
    fields = Path(f"/proc/{otel.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _receiver(conn: Connection) -> None:
    from tests.otlp_receiver import otlp_receiver

    with otlp_receiver() as receiver:
        conn.send(receiver.grpc_url)
        conn.recv()  # until the bench is done


async def _measure(cases: dict[str, Gateway], runs: int, rounds: int) -> dict[str, Any]:
    thread: dict[str, list[float]] = {name: [] for name in cases}
    process: dict[str, float] = dict.fromkeys(cases, 0.0)
    for gateway in cases.values():
        await _round(gateway, 200)  # warm-up
    names = list(cases)
    for r in range(rounds):
        # Each round starts with a different case, so no case always runs first.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gateway = cases[name]
            began = time.process_time() + _telemetry_cpu(gateway)
            thread[name] += await _round(gateway, runs)
            _recorded(gateway)  # this case's recording work counts here, not in the next case
            process[name] += time.process_time() + _telemetry_cpu(gateway) - began
    return {"thread": thread, "process": process}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples, smoke run")
    args = parser.parse_args()
    runs, rounds = (200, 3) if args.quick else (600, 12)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_receiver, args=(theirs,), daemon=True)
    child.start()
    try:
        url = ours.recv()
        otel = {"endpoint": url, "export_interval_seconds": 1}
        cases = {
            "otel off": _gateway(None),
            "otel on": _gateway(otel),
            "otel on, sample_ratio 0": _gateway({**otel, "sample_ratio": 0}),
        }
        result = asyncio.run(_measure(cases, runs, rounds))
        for gateway in cases.values():
            gateway.otel.shutdown()
    finally:
        ours.send("stop")
        child.join(10)
    _report(result, runs * rounds, args.quick)


def _report(result: dict[str, Any], n: int, quick: bool) -> None:
    thread, process = result["thread"], result["process"]
    base = statistics.mean(thread["otel off"]) * 1e6
    base_process = process["otel off"] / n * 1e6
    rows = []
    for name, samples in thread.items():
        mean = statistics.mean(samples) * 1e6
        median = statistics.median(samples) * 1e6
        per_process = process[name] / n * 1e6
        rows.append(
            [
                name,
                f"{mean:.1f}",
                f"{median:.1f}",
                f"{mean - base:+.1f}",
                f"{per_process:.1f}",
                f"{per_process - base_process:+.1f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    facts = machine_facts({})
    text = "\n".join(
        [
            "## OpenTelemetry export cost per request (in-process)",
            "",
            f"Command: `python bench/telemetry_bench.py{' --quick' if quick else ''}`; "
            f"{n} requests per case in alternating rounds after warm-up; {facts['CPU']}, "
            f"{facts['cores (nproc)']} cores, Python {facts['Python']}, "
            f"commit {facts['extproc commit']}, load {load_average()}.",
            "A whole streamed `/v1/messages` call through the servicer (7 ext_proc messages and",
            "the close that writes the audit record and hands it to the telemetry process).",
            "Event-loop thread CPU is the hot path; the last columns add every thread of the",
            "gateway process and the telemetry process (the OTLP receiver runs in a third one).",
            "Target: <= 100 µs added on the hot path.",
            "",
            table(
                [
                    "case",
                    "loop CPU µs (mean)",
                    "loop CPU µs (p50)",
                    "Δ loop vs off",
                    "gateway + telemetry CPU µs",
                    "Δ vs off",
                ],
                rows,
            ),
        ]
    )
    write_section(ROOT / "bench" / "RESULTS.md", "telemetry", text, "Benchmark results")


if __name__ == "__main__":
    main()
