"""What the ext_proc server costs: bare Envoy vs Envoy + ext_proc, in one run.

Measured against the same fast local upstream (an Envoy whose Lua filter returns a
2 KB Anthropic message over keep-alive, and for streaming a tiny asyncio server
behind it that writes message_start, content_block_start and the first delta at once):

1. requests/s and p50/p99 latency of a 2 KB non-streaming POST /v1/messages through
   (a) bare Envoy: the rendered bootstrap without the header_mutation and ext_proc
       filters and the dispatch route, so routes go straight to the provider cluster;
   (b) Envoy + ext_proc: the bootstrap `extproc up` runs, plus `extproc serve`;
   (c) Envoy + null ext_proc, a reference: bootstrap (b) against a do-nothing ext_proc
       server answering the same phases, i.e. the floor without any gateway code;
   with wrk at 1 connection (-t1 -c1) and 16 connections (-t2 -c16), each case after
   a warm-up;
2. time to first token of a streamed /v1/messages through each: from the request
   being sent to the first `content_block_delta` byte at the client, over one
   keep-alive connection per path, samples alternating between the paths;
3. CPU used by each process (and the ext_proc server's threads) during each case,
   from /proc, and with --profile a py-spy profile of the ext_proc server under load.

The report (command, machine, load average, verdict per target) replaces the
generated section of bench/RESULTS.md; the hand-written analysis around it is kept.

    python bench/gateway_bench.py                 # full run (~90 s), writes RESULTS.md
    python bench/gateway_bench.py --quick         # smoke run (~25 s), prints only
    python bench/gateway_bench.py --profile       # also profile ext_proc with py-spy

Needs wrk (`apt-get install -y wrk`) and, for --profile, py-spy (`pip install py-spy`);
--install-deps installs them. Every process started is stopped on exit, Ctrl-C or
SIGTERM, and the whole run stops itself after TIME_LIMIT seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import _common as c
import orjson
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc import server, supervisor
from tests.harness import Stack, gateway_config

MODEL = "claude-sonnet-4-5"
BODY_BYTES = 2048
CLIENT_HEADERS = {
    "content-type": "application/json",
    "anthropic-version": "2023-06-01",
    "x-api-key": "sk-bench-client-key",
}
SSE_HEADER = "x-bench-upstream"
SSE_REST_DELAY = 0.002  # the stream's remaining events follow the first ones after 2 ms
TARGET_P50_MS = 1.5
TARGET_TTFT_MS = 2.0
TARGET_RPS = 1000.0
RESULTS = c.ROOT / "bench" / "RESULTS.md"
TIME_LIMIT = 175  # seconds; the whole run, start-up and clean-up included, stays under 3 min

# -- payloads ---------------------------------------------------------------------------

_PROSE = (
    "Refactor the parser so that it yields events as soon as a full line is available, "
    "keeps partial lines between chunks, and never copies the whole buffer twice. "
)


def _padded(document: dict[str, Any], set_text: Any, size: int) -> bytes:
    """`document` with its text (placed by `set_text`) padded so the JSON is `size` bytes."""
    set_text(document, "")
    room = size - len(orjson.dumps(document))
    set_text(document, (_PROSE * (room // len(_PROSE) + 1))[:room])
    return orjson.dumps(document)


def request_body(stream: bool) -> bytes:
    document: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 1024,
        "stream": stream,
        "system": "You are a careful senior engineer.",
        "messages": [{"role": "user", "content": ""}],
    }
    return _padded(document, lambda d, t: d["messages"][0].update(content=t), BODY_BYTES)


def response_body() -> bytes:
    document: dict[str, Any] = {
        "id": "msg_01BenchBenchBenchBenchBench",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": ""}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 512,
            "output_tokens": 420,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    return _padded(document, lambda d, t: d["content"][0].update(text=t), BODY_BYTES)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _text_delta(text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return _event(
        "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
    )


def sse_parts() -> tuple[bytes, bytes]:
    """The stream in two writes: up to the first delta at once, the rest later."""
    message = orjson.loads(response_body())
    message.update(content=[], stop_reason=None, usage={"input_tokens": 512, "output_tokens": 1})
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    first = _event("message_start", {"type": "message_start", "message": message})
    first += _event("content_block_start", block) + _text_delta("Hello")
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    end["usage"] = {"output_tokens": 2}
    rest = _text_delta(" world") + _event("content_block_stop", {"type": "content_block_stop"})
    rest += _event("message_delta", end) + _event("message_stop", {"type": "message_stop"})
    return first, rest


# -- the fast upstream ------------------------------------------------------------------


# Answer from Lua after reading the whole request: a route `direct_response` is sent as
# soon as the headers arrive, and Envoy then closes the HTTP/1.1 connection (the body is
# unread), which would make the front proxy open a new upstream connection per request.
_LUA = """
function envoy_on_request(handle)
  if handle:headers():get("%s") ~= nil then return end
  handle:body()
  handle:respond({[":status"] = "200", ["content-type"] = "application/json"}, [==[%s]==])
end
"""


def _hcm(name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    lua = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    source = _LUA % (SSE_HEADER, response_body().decode())
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network"
            ".http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
            "http_filters": [
                {
                    "name": "envoy.filters.http.lua",
                    "typed_config": {
                        "@type": lua,
                        "default_source_code": {"inline_string": source},
                    },
                },
                {"name": "envoy.filters.http.router", "typed_config": {"@type": router}},
            ],
        },
    }


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def upstream_bootstrap(port: int, admin: int, sse_port: int) -> dict[str, Any]:
    """An Envoy answering /v1/messages with a 2 KB message, or proxying SSE to `sse_port`."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "sse", "timeout": "0s"}}]
    endpoint = {"endpoint": {"address": _address(sse_port)}}
    sse: dict[str, Any] = {"name": "sse", "type": "STATIC", "connect_timeout": "1s"}
    sse["load_assignment"] = {"cluster_name": "sse", "endpoints": [{"lb_endpoints": [endpoint]}]}
    listener: dict[str, Any] = {"name": "upstream", "address": _address(port)}
    listener["filter_chains"] = [{"filters": [_hcm("upstream", routes)]}]
    return {
        "admin": {"address": _address(admin)},
        "static_resources": {"listeners": [listener], "clusters": [sse]},
    }


class _SseProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive: each request gets the first events at once, the rest 2 ms later."""

    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"

    def __init__(self) -> None:
        first, rest = sse_parts()
        self.first = self.head + b"\r\n" + _chunk(first)
        self.rest = _chunk(rest) + b"0\r\n\r\n"
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            total = end + 4 + _content_length(self.buffer[:end])
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self._respond()

    def _respond(self) -> None:
        assert self.transport is not None
        self.transport.write(self.first)
        asyncio.get_running_loop().call_later(SSE_REST_DELAY, self._finish, self.transport)

    def _finish(self, transport: asyncio.Transport) -> None:
        if not transport.is_closing():
            transport.write(self.rest)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def serve_sse(port: int) -> None:
    """Run the SSE upstream until SIGTERM (the hidden `--sse-upstream PORT` mode)."""
    server.install_event_loop_policy()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(_SseProtocol, "127.0.0.1", port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with listener:
            await stop.wait()

    asyncio.run(main())


def start_helper(mode: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """This script in a hidden mode (`--sse-upstream` or `--null-extproc`) on `port`."""
    command = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", str(port)]
    log_path = workdir / f"{mode}.log"
    with log_path.open("ab") as log:
        process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return process
        time.sleep(0.05)
    c.stop_all([process])
    raise c.BenchError(f"{mode} did not start:\n{log_path.read_text()}")


# -- the reference ext_proc: gRPC and the four phases, no policy ------------------------


class NullProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers every phase with an empty reply; only picks the response body mode.

    Same process setup as `extproc serve` (uvloop, the same gRPC transport and limits),
    so the gap between it and the real server is the cost of the gateway's own code.
    """

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield null_reply(request)


def null_reply(request: Any) -> Any:
    phase = request.WhichOneof("request")
    response = pb.ProcessingResponse()
    getattr(response, phase).SetInParent()
    if phase == "response_headers":
        headers = request.response_headers.headers.headers
        sse = any(h.raw_value.startswith(b"text/event-stream") for h in headers)
        mode = processing_mode_pb2.ProcessingMode
        response.mode_override.response_body_mode = mode.STREAMED if sse else mode.BUFFERED
    return response


def serve_null(port: int) -> None:
    """Run the reference ext_proc server until SIGTERM (the hidden `--null-extproc` mode)."""
    c.serve_ext_proc(port, NullProcessor())


# -- the front proxies ------------------------------------------------------------------

BARE, GATEWAY, NULL = "bare Envoy", "Envoy + ext_proc", "Envoy + null ext_proc"
# Each path: the Envoy in front, and the ext_proc server behind it (None for bare Envoy).
PATHS: dict[str, tuple[str, str | None]] = {
    BARE: ("bare Envoy", None),
    GATEWAY: ("gateway Envoy", "ext_proc"),
    NULL: ("null-ext_proc Envoy", "null ext_proc"),
}


def bench_config(upstream_url: str) -> dict[str, Any]:
    """The gateway config: the fast upstream as the Anthropic provider, a held credential."""
    config = gateway_config(upstream_url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-ant-bench-provider-key"}
    return config


def _moved(bootstrap: dict[str, Any], port: int) -> dict[str, Any]:
    """A copy of `bootstrap` listening on `port`, with a fresh admin port."""
    moved = copy.deepcopy(bootstrap)
    moved["admin"]["address"] = _address(c.free_port())
    moved["static_resources"]["listeners"][0]["address"] = _address(port)
    return moved


def bare_bootstrap(gateway: dict[str, Any], port: int) -> dict[str, Any]:
    """The gateway bootstrap without ext_proc: no header_mutation/ext_proc, no dispatch route."""
    bare = _moved(gateway, port)
    hcm = bare["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm = hcm["typed_config"]
    dropped = {"envoy.filters.http.ext_proc", "envoy.filters.http.header_mutation"}
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in dropped]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [r for r in vhost["routes"] if r.get("name") != "dispatch"]
    clusters = bare["static_resources"]["clusters"]
    bare["static_resources"]["clusters"] = [k for k in clusters if k["name"] != "extproc"]
    return bare


def null_bootstrap(gateway: dict[str, Any], port: int, grpc_port: int) -> dict[str, Any]:
    """The gateway bootstrap with its ext_proc cluster pointed at the null server."""
    null = _moved(gateway, port)
    cluster = next(k for k in null["static_resources"]["clusters"] if k["name"] == "extproc")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"] = _address(grpc_port)
    return null


@dataclass
class Rig:
    """Everything the bench runs: upstreams, the three front proxies, two ext_proc servers."""

    workdir: Path
    envoys: dict[str, c.EnvoyProcess] = field(default_factory=dict)
    helpers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stack: Stack | None = None
    urls: dict[str, str] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        pids = {name: envoy.pid for name, envoy in self.envoys.items()}
        pids.update({name: process.pid for name, process in self.helpers.items()})
        if self.stack is not None:
            pids["ext_proc"] = self.stack.processes["extproc"].pid
        return pids

    def start_envoy(self, name: str, bootstrap: dict[str, Any]) -> None:
        self.envoys[name] = c.EnvoyProcess(name.replace(" ", "-"), bootstrap, self.workdir)
        self.envoys[name].start()

    def close(self) -> None:
        for envoy in reversed(list(self.envoys.values())):
            envoy.stop()
        if self.stack is not None:
            self.stack.close()
        c.stop_all(list(self.helpers.values()))


def _start_front_proxies(rig: Rig, upstream_url: str) -> None:
    rig.stack = Stack(bench_config(upstream_url), rig.workdir)
    rig.stack.start_extproc()
    gateway = rig.stack.bootstrap()
    rig.start_envoy(PATHS[GATEWAY][0], gateway)
    rig.urls[GATEWAY] = rig.stack.url
    null_port = c.free_port()
    rig.helpers["null ext_proc"] = start_helper("null-extproc", null_port, rig.workdir)
    for path, bootstrap in ((BARE, bare_bootstrap), (NULL, null_bootstrap)):
        port = c.free_port()
        extra = (null_port,) if path == NULL else ()
        rig.start_envoy(PATHS[path][0], bootstrap(gateway, port, *extra))
        rig.urls[path] = f"http://127.0.0.1:{port}"


def _start_rig(rig: Rig) -> None:
    sse_port, port = c.free_port(), c.free_port()
    rig.helpers["SSE upstream"] = start_helper("sse-upstream", sse_port, rig.workdir)
    rig.start_envoy("upstream Envoy", upstream_bootstrap(port, c.free_port(), sse_port))
    _start_front_proxies(rig, f"http://127.0.0.1:{port}")
    rig.urls = {path: rig.urls[path] for path in PATHS}


@contextlib.contextmanager
def running_rig(workdir: Path, attempts: int = 3) -> Iterator[Rig]:
    """All processes up; a start that lost a free port to another process is retried."""
    for attempt in range(1, attempts + 1):
        rig = Rig(workdir)
        try:
            _start_rig(rig)
            break
        except c.BenchError as exc:
            rig.close()
            if "already in use" not in str(exc).lower() or attempt == attempts:
                raise
        except BaseException:
            rig.close()
            raise
    try:
        yield rig
    finally:
        rig.close()


# -- checks -----------------------------------------------------------------------------


def probe(url: str, through_gateway: bool) -> None:
    """One request per body kind; fail loudly unless it took the intended path."""
    host, port = url.removeprefix("http://").split(":")
    for stream in (False, True):
        headers = dict(CLIENT_HEADERS, **({SSE_HEADER: "sse"} if stream else {}))
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("POST", "/v1/messages", request_body(stream), headers)
        reply = connection.getresponse()
        body = reply.read()
        connection.close()
        _check_reply(url, reply, body, stream, through_gateway)


def _check_reply(
    url: str, reply: http.client.HTTPResponse, body: bytes, stream: bool, gateway: bool
) -> None:
    expected = b"message_stop" if stream else response_body()
    if reply.status != 200 or expected not in body:
        raise c.BenchError(f"{url}: unexpected reply {reply.status}: {body[:300]!r}")
    marked = reply.getheader("x-gateway-request-id") is not None
    if marked != gateway:
        raise c.BenchError(f"{url}: x-gateway-request-id present={marked}, expected {gateway}")


# -- load cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    path: str
    connections: int

    @property
    def threads(self) -> int:
        return 1 if self.connections == 1 else 2


@dataclass
class CaseResult:
    case: Case
    wrk: c.WrkResult
    cpu: c.CpuUse


def run_case(rig: Rig, case: Case, wrk: str, script: Path, args: argparse.Namespace) -> CaseResult:
    url = rig.urls[case.path] + "/v1/messages"
    warm = c.wrk_command(wrk, url, script, case.threads, case.connections, args.warmup)
    c.run_wrk(warm, args.warmup)
    command = c.wrk_command(wrk, url, script, case.threads, case.connections, args.duration)
    meter = c.CpuMeter(rig.pids())
    meter.begin()
    result = c.run_wrk(command, args.duration)
    cpu = meter.end()
    print(
        f"  {case.path:22} c={case.connections:<3} {result.rps:8.0f} req/s  "
        f"p50 {result.p50_ms:6.3f} ms  p99 {result.p99_ms:6.3f} ms",
        flush=True,
    )
    return CaseResult(case, result, cpu)


# -- time to first token ----------------------------------------------------------------


class SseClient:
    """One keep-alive HTTP/1.1 connection that times the first content_block_delta."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = request_body(stream=True)
        lines = [f"POST /v1/messages HTTP/1.1\r\nhost: {host}:{port}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in {**CLIENT_HEADERS, SSE_HEADER: "sse"}.items()]
        lines.append(f"content-length: {len(body)}\r\n\r\n")
        self.request = "".join(lines).encode() + body

    def ttft_ms(self) -> float:
        started = time.perf_counter_ns()
        self.sock.sendall(self.request)
        buffer, first = b"", 0
        while not buffer.endswith(b"\r\n0\r\n\r\n"):
            data = self.sock.recv(65536)
            if not data:
                raise c.BenchError("the connection closed mid-stream")
            buffer += data
            if not first and b"content_block_delta" in buffer:
                first = time.perf_counter_ns()
        if not buffer.startswith(b"HTTP/1.1 200") or b"message_stop" not in buffer:
            raise c.BenchError(f"bad streamed reply: {buffer[:300]!r}")
        return (first - started) / 1e6

    def close(self) -> None:
        self.sock.close()


def measure_ttft(rig: Rig, samples: int, budget: float) -> dict[str, list[float]]:
    """TTFT samples per path, alternating paths so background noise hits all alike."""
    clients = {path: SseClient(url) for path, url in rig.urls.items()}
    out: dict[str, list[float]] = {path: [] for path in clients}
    try:
        for _ in range(20):
            for client in clients.values():
                client.ttft_ms()
        deadline = time.monotonic() + budget
        while len(out[BARE]) < samples and time.monotonic() < deadline:
            for path, client in clients.items():
                out[path].append(client.ttft_ms())
    finally:
        for client in clients.values():
            client.close()
    return out


# -- profiling --------------------------------------------------------------------------


def profile_extproc(rig: Rig, wrk: str, script: Path, seconds: float) -> tuple[Path, str]:
    """py-spy samples of the ext_proc server while wrk drives 16 connections through it."""
    py_spy = c.require_tools(["py-spy"], install=False)["py-spy"]
    folded = rig.workdir / "extproc-profile.txt"
    pid = rig.pids()["ext_proc"]
    command = [py_spy, "record", "--format", "raw", "--rate", "250", "--nonblocking"]
    command += ["--pid", str(pid), "--duration", str(round(seconds)), "-o", str(folded)]
    profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        url = rig.urls[GATEWAY] + "/v1/messages"
        c.run_wrk(c.wrk_command(wrk, url, script, 2, 16, seconds - 1), seconds)
        profiler.wait(timeout=seconds + 30)
    finally:
        c.stop_all([profiler])
    return folded, summarize_profile(folded)


def _frame_name(frame: str) -> str:
    name, _, location = frame.strip().partition(" (")
    path = location.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    return f"{name} ({short})"


# Frames whose own samples are time in native code they call (socket I/O, uvloop's C loop):
# py-spy without --native attributes that time to the innermost Python frame.
_NATIVE_CALLERS = ("ExternalProcessor.Process ", "Runner.run ", "Thread.run ")
# Entry frames present in every stack of a thread; left out of the inclusive table.
_ENTRY_FILES = ("runpy>)", "cli.py)", "__main__.py)", "runners.py)", "threading.py)")


def summarize_profile(folded: Path, top: int = 15) -> str:
    """Markdown: the native share, then the hottest functions by own and inclusive samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count, frames = int(count_text), [_frame_name(f) for f in stack.split(";")[1:]]
        total += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            if not name.endswith(_ENTRY_FILES):
                inclusive[name] = inclusive.get(name, 0) + count
    native = sum(n for name, n in own.items() if name.startswith(_NATIVE_CALLERS))
    return _profile_tables(own, inclusive, total, top, native)


def _profile_tables(
    own: dict[str, int], inclusive: dict[str, int], total: int, top: int, native: int
) -> str:
    def rows(counts: dict[str, int]) -> list[list[str]]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [[f"`{name}`", f"{100 * n / max(total, 1):.1f}%"] for name, n in ranked]

    share = 100 * native / max(total, 1)
    return (
        f"{total} on-CPU samples of the ext_proc server's threads. {share:.0f}% of them are "
        "in native code called straight from the servicer loop, the event loop or a bare "
        "thread (uvloop's C loop and socket reads and writes); the rest is "
        "Python: the gateway's code and the libraries it calls.\n\n"
        + c.table(["function (own time)", "share"], rows(own))
        + "\n\n"
        + c.table(["function (inclusive)", "share"], rows(inclusive))
    )


# -- report -----------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _by_case(results: Sequence[CaseResult]) -> dict[tuple[str, int], CaseResult]:
    return {(r.case.path, r.case.connections): r for r in results}


def load_table(results: Sequence[CaseResult]) -> str:
    by = _by_case(results)
    rows = []
    for r in results:
        base, w = by[(BARE, r.case.connections)].wrk, r.wrk
        rows.append(
            [
                r.case.path,
                f"{r.case.connections} (wrk -t{r.case.threads} -c{r.case.connections})",
                f"{w.rps:,.0f}",
                _ms(w.p50_ms),
                _ms(w.p99_ms),
                _signed(w.p50_ms - base.p50_ms),
                _signed(w.p99_ms - base.p99_ms),
                f"{w.rps / base.rps:.2f}x" if base.rps else "-",
            ]
        )
    header = ["case", "connections", "req/s", "p50 ms", "p99 ms", "Δp50 ms", "Δp99 ms", "vs bare"]
    return c.table(header, rows)


def extproc_us_per_request(result: CaseResult) -> float | None:
    server_name = PATHS[result.case.path][1]
    if server_name is None or not result.wrk.requests:
        return None
    return result.cpu.seconds.get(server_name, 0.0) / result.wrk.requests * 1e6


def _us(seconds: float, requests: int) -> str:
    return f"{seconds / requests * 1e6:,.0f}" if requests else "-"


def cores_table(results: Sequence[CaseResult]) -> str:
    rows = []
    for r in results:
        front, server_name = PATHS[r.case.path]
        rows.append(
            [
                r.case.path,
                str(r.case.connections),
                f"{r.cpu.cores(front):.2f}",
                f"{r.cpu.cores(server_name):.2f}" if server_name else "-",
                f"{r.cpu.cores('upstream Envoy'):.2f}",
                f"{r.cpu.cores('load generator'):.2f}",
                f"{r.cpu.total() / r.cpu.wall:.2f}",
            ]
        )
    header = ["case", "conns", "front Envoy", "ext_proc", "upstream", "wrk", "sum"]
    note = "Cores busy (1.00 = one core) during each measured run, from /proc:\n\n"
    return note + c.table(header, rows)


def per_request_table(results: Sequence[CaseResult]) -> str:
    cores = os.cpu_count() or 1
    rows = []
    for r in results:
        front, server_name = PATHS[r.case.path]
        n, total = r.wrk.requests, r.cpu.total()
        main = r.cpu.threads.get(server_name or "", {}).get(c.MAIN_THREAD)
        rows.append(
            [
                r.case.path,
                str(r.case.connections),
                _us(r.cpu.seconds.get(front, 0.0), n),
                _us(r.cpu.seconds[server_name], n) if server_name else "-",
                _us(main, n) if main is not None else "-",
                _us(total, n),
                f"{cores * n / total:,.0f}" if total else "-",
            ]
        )
    header = ["case", "conns", "front Envoy", "ext_proc", "ext_proc main thread", "all"]
    header.append(f"ceiling on {cores} idle cores, req/s")
    note = (
        "CPU µs per request. *all* adds up every process of the bench (both Envoys, the "
        "ext_proc server, wrk); the ceiling is what that cost allows if the bench had every "
        "core to itself.\n\n"
    )
    return note + c.table(header, rows)


def thread_table(results: Sequence[CaseResult]) -> str:
    busiest = _by_case(results)[(GATEWAY, max(r.case.connections for r in results))]
    threads = busiest.cpu.threads.get("ext_proc", {})
    rows = [
        [name, f"{seconds / busiest.cpu.wall:.2f}", _us(seconds, busiest.wrk.requests)]
        for name, seconds in sorted(threads.items(), key=lambda item: -item[1])
        if seconds > 0.005 * busiest.cpu.wall
    ]
    title = (
        f"ext_proc CPU by thread at {busiest.case.connections} connections (`event_engine`: "
        "gRPC C-core threads, none since the server's own transport; `python`: threads Python "
        "started, e.g. the idle metrics server):\n\n"
    )
    return title + c.table(["thread", "cores", "µs per request"], rows)


def ttft_table(ttft: dict[str, list[float]]) -> str:
    bare = ttft[BARE]
    rows = [
        [
            path,
            str(len(samples)),
            _ms(c.percentile(samples, 50)),
            _ms(c.percentile(samples, 99)),
            _signed(c.percentile(samples, 50) - c.percentile(bare, 50)),
            _signed(c.percentile(samples, 99) - c.percentile(bare, 99)),
        ]
        for path, samples in ttft.items()
    ]
    return c.table(["path", "samples", "TTFT p50 ms", "TTFT p99 ms", "Δp50 ms", "Δp99 ms"], rows)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _added(
    results: Sequence[CaseResult], ttft: dict[str, list[float]], path: str
) -> tuple[float, float, float]:
    """What `path` adds over bare Envoy: p50 at 1 connection, TTFT p50; and its best req/s."""
    by = _by_case(results)
    p50 = by[(path, 1)].wrk.p50_ms - by[(BARE, 1)].wrk.p50_ms
    first_token = c.percentile(ttft[path], 50) - c.percentile(ttft[BARE], 50)
    return p50, first_token, max(r.wrk.rps for r in results if r.case.path == path)


def verdicts(results: Sequence[CaseResult], ttft: dict[str, list[float]]) -> list[list[str]]:
    real = _added(results, ttft, GATEWAY)
    floor = _added(results, ttft, NULL)
    names = (
        f"ext_proc adds <= {TARGET_P50_MS} ms p50 at 1 connection",
        f"ext_proc adds <= {TARGET_TTFT_MS} ms to TTFT (p50)",
        f"Envoy + ext_proc sustains >= {TARGET_RPS:,.0f} req/s",
    )
    met = (real[0] <= TARGET_P50_MS, real[1] <= TARGET_TTFT_MS, real[2] >= TARGET_RPS)
    shown = [(f"{v:+.3f} ms", f"{f:+.3f} ms") for v, f in zip(real[:2], floor[:2], strict=True)]
    shown.append((f"{real[2]:,.0f} req/s", f"{floor[2]:,.0f} req/s"))
    return [
        [name, value, _verdict(ok), reference]
        for name, (value, reference), ok in zip(names, shown, met, strict=True)
    ]


def policy_share(results: Sequence[CaseResult]) -> str:
    """How much of the ext_proc cost is the gateway's code versus gRPC + the four phases."""
    lines = []
    for connections in sorted({r.case.connections for r in results}):
        by = _by_case(results)
        real = extproc_us_per_request(by[(GATEWAY, connections)])
        floor = extproc_us_per_request(by[(NULL, connections)])
        if real is None or floor is None or not real:
            continue
        lines.append(
            f"- {connections} connection(s): ext_proc {real:,.0f} µs CPU per request, of which "
            f"the null server (gRPC + 4 phases, no policy) needs {floor:,.0f} µs "
            f"({100 * floor / real:.0f}%); the gateway's own code adds {real - floor:,.0f} µs."
        )
    return "\n".join(lines)


@dataclass
class Run:
    """Everything the report needs from one run."""

    command: str
    facts: dict[str, str]
    load_before: str
    load_after: str
    args: argparse.Namespace
    results: list[CaseResult]
    ttft: dict[str, list[float]]
    profile: str | None = None


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def render(run: Run) -> str:
    facts = [[k, f"`{v}`" if k == "extproc commit" else v] for k, v in run.facts.items()]
    facts += [["load average (1/5/15 min) before", run.load_before]]
    facts += [["load average (1/5/15 min) after", run.load_after]]
    parts = [
        "## Latest run (generated by bench/gateway_bench.py)",
        f"Run {_now()}:\n\n```\n{run.command}\n```",
        c.table(["machine", ""], facts),
        _idle_note(run.load_before),
        _method(run.args),
        "### Targets\n\n"
        + c.table(
            ["target", "measured", "verdict", f"{NULL} (floor)"], verdicts(run.results, run.ttft)
        ),
        "### Non-streaming 2 KB POST /v1/messages\n\n" + load_table(run.results),
        "### Time to first token (streamed /v1/messages, 1 connection)\n\n" + ttft_table(run.ttft),
        "### CPU\n\n" + cores_table(run.results),
        per_request_table(run.results),
        policy_share(run.results),
        thread_table(run.results),
    ]
    if run.profile:
        parts.append("### py-spy profile of ext_proc (16 connections)\n\n" + run.profile)
    return "\n\n".join(parts)


def _method(args: argparse.Namespace) -> str:
    return (
        f"Each load case: {args.warmup:g} s warm-up, then {args.duration:g} s measured with "
        "wrk (closed loop, keep-alive). At 16 connections the two wrk threads compete with "
        "Envoy, ext_proc and the upstream for the same cores. TTFT: up to "
        f"{args.ttft_samples} samples per path after 20 warm-up requests, alternating paths, "
        "each timed from sending the request to receiving the first `content_block_delta` "
        "byte; the upstream writes message_start, content_block_start and the first delta at "
        "once. Upstream: an Envoy answering from a Lua filter (2 KB JSON, keep-alive); for "
        "SSE an asyncio server behind that Envoy. Request body: 2,048 bytes. "
        f"*{NULL}* is a reference, not a product path: the gateway's Envoy bootstrap with a "
        "do-nothing ext_proc server (same event loop and gRPC transport as "
        "`extproc serve`), i.e. the floor for any Python ext_proc using these four phases."
    )


def _idle_note(before: str) -> str:
    one = float(before.split("/")[0])
    if one < 0.3 * (os.cpu_count() or 1):
        return "The machine looked idle before the run."
    return (
        f"**The machine was not idle** (1-minute load average {one:.2f} on "
        f"{os.cpu_count()} cores before the run): other work competed for the CPU, so "
        "absolute numbers are pessimistic and noisy; re-run on a quiet machine."
    )


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; prints only")
    parser.add_argument("--duration", type=float, help="measured seconds per case (10)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per case (2)")
    parser.add_argument("--ttft-samples", type=int, help="TTFT samples per path (1000)")
    parser.add_argument("--profile", action="store_true", help="also py-spy the ext_proc server")
    parser.add_argument("--output", type=Path, help=f"report file (default {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--install-deps", action="store_true", help="apt/pip-install wrk, py-spy")
    parser.add_argument("--sse-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--null-extproc", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (2.0 if quick else 10.0)
    args.warmup = args.warmup or (1.0 if quick else 2.0)
    args.ttft_samples = args.ttft_samples or (100 if quick else 1000)
    args.ttft_budget = 5.0 if quick else 15.0
    if planned_seconds(args) > TIME_LIMIT - 20:
        parser.error(
            f"--duration/--warmup plan {planned_seconds(args):.0f} s; the run must end "
            f"within {TIME_LIMIT} s"
        )
    args.write = not args.no_write and (args.output is not None or not quick)
    args.output = args.output or RESULTS
    return args


def planned_seconds(args: argparse.Namespace) -> float:
    cases = len(PATHS) * 2 * (args.duration + args.warmup)
    return float(cases + args.ttft_budget + (args.duration + 1 if args.profile else 0))


_interrupted: list[int] = []


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # Ctrl-C also reaches wrk and Envoy (same process group); remember it so that the
    # failures it causes are reported as an interruption.
    _interrupted.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _out_of_time(_signum: int, _frame: FrameType | None) -> None:
    raise c.BenchError(f"the run took longer than {TIME_LIMIT} s; stopped")


def measure(args: argparse.Namespace, tools: dict[str, str], workdir: Path) -> Run:
    command = "python bench/gateway_bench.py " + shlex.join(sys.argv[1:])
    run = Run(command.strip(), c.machine_facts(tools), c.load_average(), "", args, [], {})
    script = workdir / "post.lua"
    script.write_text(c.wrk_script("POST", request_body(False), CLIENT_HEADERS), encoding="utf-8")
    with running_rig(workdir) as rig:
        for path, url in rig.urls.items():
            probe(url, through_gateway=path == GATEWAY)
        for connections in (1, 16):
            for path in rig.urls:
                run.results.append(
                    run_case(rig, Case(path, connections), tools["wrk"], script, args)
                )
        run.ttft = measure_ttft(rig, args.ttft_samples, args.ttft_budget)
        if args.profile:
            _, run.profile = profile_extproc(rig, tools["wrk"], script, args.duration)
    run.load_after = c.load_average()
    return run


_INTERRUPTED = "gateway_bench: interrupted; every process it started was stopped"


def run_bench(args: argparse.Namespace) -> Run | int:
    """The measurement with signal handling: a `Run`, or an exit code on failure."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGALRM, _out_of_time)
    try:
        tools = c.require_tools(["wrk", *(["py-spy"] if args.profile else [])], args.install_deps)
        signal.alarm(TIME_LIMIT)
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir:
            return measure(args, tools, Path(workdir))
    except c.BenchError as exc:
        print(_INTERRUPTED if _interrupted else f"gateway_bench: {exc}", file=sys.stderr)
        return 130 if _interrupted else 1
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sse_upstream:
        serve_sse(args.sse_upstream)
        return 0
    if args.null_extproc:
        serve_null(args.null_extproc)
        return 0
    run = run_bench(args)
    if isinstance(run, int):
        return run
    report = render(run)
    print("\n" + report)
    if args.write:
        c.write_section(args.output, "gateway-bench", report, "Benchmark results")
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
