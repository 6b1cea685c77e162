"""Response cache: hit latency through Envoy, and what the cache key costs.

1. Hit latency. Each request body (2 KB, and the 117 KB Claude Code-style body of
   tests/data/claude_code_request.py, both non-streaming) is sent once through
   Envoy + `extproc serve` with `profiles: {default: {cache: {enabled: true}}}` on the
   memory store; the answer of that priming request (from a fast Lua upstream) is
   cached, and every later identical request is a hit answered by an ImmediateResponse.
   wrk at 1 connection (-t1 -c1) then measures p50/p99 of:
   (a) bare Envoy serving the same bytes: the same bootstrap without ext_proc, whose
       Lua filter reads the request body and answers with the exact bytes of the hit;
   (b) Envoy + ext_proc, cache hit;
   (c) Envoy + null hit server, a reference: bootstrap (b) against a do-nothing
       ext_proc (the gateway's gRPC transport) that answers the body phase with the same bytes as an
       ImmediateResponse, i.e. the floor of any Python ext_proc serving a hit.
   Cases alternate round by round; the figure per case is the median over rounds.
   Targets: a hit adds <= 1 ms (2 KB) and <= 3 ms (117 KB) p50 over (a).
2. Key computation, in-process: `extproc.policies.cache.cache_key` (every cached
   request: hit and miss) and `Shape.of` (misses only, for cache hygiene) on the
   parsed bodies, with the JSON parse the gateway does anyway as a yardstick.

    python bench/cache_bench.py              # ~75 s, writes the cache-bench section of RESULTS.md
    python bench/cache_bench.py --quick      # ~25 s smoke run, prints only
    python bench/cache_bench.py --profile    # also py-spy the ext_proc server serving 2 KB hits

Every process started (two upstream/bare/null Envoys, the gateway Envoy, the ext_proc
and null servers) is stopped on exit, Ctrl-C or SIGTERM, and dies with the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import functools
import http.client
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import gateway_bench as gb
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc import server, supervisor
from extproc.apis import Endpoint
from extproc.config import Config
from extproc.policies.cache import Entry, Shape, cache_key
from tests.data.claude_code_request import build_request
from tests.harness import Stack

SIZES = ("2 KB", "117 KB")
TARGET_ADDED_MS = {"2 KB": 1.0, "117 KB": 3.0}
BARE, GATEWAY, NULL = "bare Envoy (same bytes)", "Envoy + ext_proc (hit)", "Envoy + null hit server"
SERVERS = {GATEWAY: "ext_proc", NULL: "null hit server"}
PARSE = "orjson.loads of the body (yardstick: the gateway parses it once anyway)"
KEY = "cache_key (every cached request: hit and miss)"
SHAPE = "Shape.of (misses only: cache hygiene)"
RESULTS = c.ROOT / "bench" / "RESULTS.md"
SECTION = "cache-bench"
TIME_LIMIT = 150
PROFILE_SECONDS = 6


def bodies() -> dict[str, bytes]:
    """The two request bodies, non-streaming (the cache key ignores `stream` anyway)."""
    large = build_request()
    large["stream"] = False
    return {"2 KB": gb.request_body(False), "117 KB": orjson.dumps(large)}


# -- in-process key cost ----------------------------------------------------------------


def _time_us(fn: Callable[[], object], runs: int) -> list[float]:
    for _ in range(min(50, runs)):
        fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


@dataclass(frozen=True)
class KeyCost:
    size: str
    nbytes: int
    what: str
    samples: list[float]


def key_costs(payloads: dict[str, bytes], quick: bool) -> list[KeyCost]:
    headers = dict(gb.CLIENT_HEADERS)
    scope = "anon=0123456789abcdef"
    out = []
    for size, raw in payloads.items():
        body = orjson.loads(raw)
        runs = (200 if quick else 2000) if len(raw) < 10_000 else (50 if quick else 400)
        calls: dict[str, Callable[[], object]] = {
            PARSE: functools.partial(orjson.loads, raw),
            KEY: functools.partial(cache_key, "anthropic", Endpoint.MESSAGES, scope, body, headers),
            SHAPE: functools.partial(Shape.of, "anthropic", body),
        }
        for what, fn in calls.items():
            out.append(KeyCost(size, len(raw), what, _time_us(fn, runs)))
    return out


def entry_cost(answer: bytes, quick: bool) -> list[float]:
    """Decoding a stored entry and serialising its answer: the rest of a hit's CPU."""
    raw = Entry("anthropic", orjson.loads(answer), time.time()).encode()

    def serve() -> bytes:
        entry = Entry.decode(raw)
        assert entry is not None
        return orjson.dumps(entry.answer)

    return _time_us(serve, 200 if quick else 2000)


# -- the null hit server: the floor of serving a hit from Python -------------------------


class NullHit(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Empty reply to the request headers; an ImmediateResponse with `answer` to the body."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            response = pb.ProcessingResponse()
            if request.WhichOneof("request") == "request_body":
                immediate = response.immediate_response
                immediate.status.code = 200
                header = immediate.headers.set_headers.add()
                header.header.CopyFrom(
                    base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
                )
                immediate.body = self.answer
                immediate.details = "null_hit"
            else:
                getattr(response, request.WhichOneof("request")).SetInParent()
            yield response


def serve_null_hit(port: int, answer_file: Path) -> None:
    """Run the null hit server until SIGTERM (hidden `--null-hit PORT --answer FILE` mode)."""
    server.install_event_loop_policy()
    answer = answer_file.read_bytes()

    async def main() -> None:
        grpc_server = server.process_server(NullHit(answer).Process, Config())
        await grpc_server.listen("127.0.0.1", port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await grpc_server.stop(1)

    asyncio.run(main())


def start_null_hit(answer: bytes, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = c.free_port()
    answer_file = workdir / "answer.json"
    answer_file.write_bytes(answer)
    command = [sys.executable, str(Path(__file__).resolve()), "--null-hit", str(port)]
    command += ["--answer", str(answer_file)]
    log_path = workdir / "null-hit.log"
    with log_path.open("ab") as log:
        process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
    if not c.wait_port(port, process):
        c.stop_all([process])
        raise c.BenchError(f"the null hit server did not start:\n{log_path.read_text()}")
    return process, port


# -- the rig ----------------------------------------------------------------------------


@dataclass
class Rig:
    workdir: Path
    envoys: list[c.EnvoyProcess] = field(default_factory=list)
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stack: Stack | None = None
    urls: dict[str, str] = field(default_factory=dict)
    answer: bytes = b""

    def pids(self) -> dict[str, int]:
        """Watched processes: each path's front Envoy (named by path) and server."""
        fronts = dict(zip(("bare", "gateway", "null-hit"), (BARE, GATEWAY, NULL), strict=True))
        pids = {fronts[e.name]: e.pid for e in self.envoys if e.name in fronts}
        assert self.stack is not None
        pids[SERVERS[GATEWAY]] = self.stack.processes["extproc"].pid
        pids[SERVERS[NULL]] = self.helpers[0].pid
        return pids

    def envoy(self, name: str, bootstrap: dict[str, Any]) -> None:
        self.envoys.append(c.EnvoyProcess(name, bootstrap, self.workdir))
        self.envoys[-1].start()

    def close(self) -> None:
        for envoy in reversed(self.envoys):
            envoy.stop()
        if self.stack is not None:
            self.stack.close()
        c.stop_all(self.helpers)


def _post(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", "/v1/messages", body, gb.CLIENT_HEADERS)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def prime(url: str, body: bytes) -> bytes:
    """Cache the answer to `body` (one miss), check the next request hits; the hit's bytes."""
    status, headers, _ = _post(url, body)
    if status != 200 or headers.get("x-gateway-cache") != "miss":
        raise c.BenchError(
            f"priming request: {status}, x-gateway-cache={headers.get('x-gateway-cache')}"
        )
    status, headers, answer = _post(url, body)
    if status != 200 or headers.get("x-gateway-cache") != "hit":
        raise c.BenchError(f"second request did not hit: {status} {headers} {answer[:200]!r}")
    return answer


def _with_responder(bootstrap: dict[str, Any], answer: bytes) -> dict[str, Any]:
    bare = copy.deepcopy(bootstrap)
    filters = c.hcm_of(bare)["http_filters"]
    filters.insert(len(filters) - 1, c.lua_responder(answer, "application/json"))
    return bare


def start_rig(rig: Rig, payloads: dict[str, bytes]) -> None:
    port = c.free_port()
    # The SSE cluster of the upstream bootstrap is never used here: any port will do.
    rig.envoy("upstream", gb.upstream_bootstrap(port, c.free_port(), c.free_port()))
    config = gb.bench_config(f"http://127.0.0.1:{port}")
    config["profiles"] = {"default": {"cache": {"enabled": True}}}
    rig.stack = Stack(config, rig.workdir)
    rig.stack.start_extproc()
    gateway = rig.stack.bootstrap()
    rig.envoy("gateway", gateway)
    answers = {prime(rig.stack.url, body) for body in payloads.values()}
    if len(answers) != 1:
        raise c.BenchError("the two bodies were answered with different bytes")
    rig.answer = answers.pop()
    bare_port, null_port = c.free_port(), c.free_port()
    rig.envoy("bare", _with_responder(gb.bare_bootstrap(gateway, bare_port), rig.answer))
    process, grpc_port = start_null_hit(rig.answer, rig.workdir)
    rig.helpers.append(process)
    rig.envoy("null-hit", gb.null_bootstrap(gateway, null_port, grpc_port))
    rig.urls = {
        BARE: f"http://127.0.0.1:{bare_port}",
        GATEWAY: rig.stack.url,
        NULL: f"http://127.0.0.1:{null_port}",
    }
    for name, url in rig.urls.items():
        for body in payloads.values():
            status, headers, answer = _post(url, body)
            if status != 200 or answer != rig.answer:
                raise c.BenchError(f"{name}: {status} {answer[:200]!r}")
            if (headers.get("x-gateway-cache") == "hit") != (name == GATEWAY):
                raise c.BenchError(f"{name}: x-gateway-cache={headers.get('x-gateway-cache')}")


@contextlib.contextmanager
def running_rig(workdir: Path, payloads: dict[str, bytes]) -> Iterator[Rig]:
    rig = Rig(workdir)
    try:
        start_rig(rig, payloads)
        yield rig
    finally:
        rig.close()


def cache_hits(stack: Stack) -> int:
    found = re.search(
        r'^extproc_cache_requests_total\{result="hit"\} (\S+)$', stack.metrics_text(), re.M
    )
    return int(float(found.group(1))) if found else 0


# -- measurement ------------------------------------------------------------------------


@dataclass
class Run:
    command: str
    facts: dict[str, str]
    load_before: str
    args: argparse.Namespace
    load_after: str = ""
    nbytes: dict[str, int] = field(default_factory=dict)
    answer_bytes: int = 0
    latency: dict[tuple[str, str], list[c.Measured]] = field(default_factory=dict)
    hits_counted: int = 0
    hits_sent: int = 0
    keys: list[KeyCost] = field(default_factory=list)
    entry: list[float] = field(default_factory=list)
    profile: str | None = None


def measure(args: argparse.Namespace, wrk: str, workdir: Path) -> Run:
    command = ("python bench/cache_bench.py " + shlex.join(sys.argv[1:])).strip()
    run = Run(command, c.machine_facts({"wrk": wrk}), c.load_average(), args)
    payloads = bodies()
    run.nbytes = {size: len(body) for size, body in payloads.items()}
    with running_rig(workdir, payloads) as rig:
        assert rig.stack is not None
        run.answer_bytes = len(rig.answer)
        for size, body in payloads.items():
            script = workdir / f"post-{size.replace(' ', '')}.lua"
            script.write_text(c.wrk_script("POST", body, gb.CLIENT_HEADERS), encoding="utf-8")
            cases = {name: (url + "/v1/messages", script) for name, url in rig.urls.items()}
            c.wrk_rounds(wrk, cases, 1, args.warmup, 1)
            before = cache_hits(rig.stack)
            results = c.wrk_rounds(wrk, cases, 1, args.seconds, args.rounds, rig.pids())
            run.hits_counted += cache_hits(rig.stack) - before
            run.hits_sent += sum(r.wrk.requests for r in results[GATEWAY])
            for name, rounds in results.items():
                run.latency[(size, name)] = rounds
                print(
                    f"  {size:7} {name:26} p50 {_p50(rounds):6.3f} ms  p99 {_p99(rounds):6.3f} ms",
                    flush=True,
                )
        if args.profile:
            run.profile = profile_hits(rig, wrk, workdir / "post-2KB.lua", PROFILE_SECONDS)
        run.keys = key_costs(payloads, args.quick)
        run.entry = entry_cost(rig.answer, args.quick)
    run.load_after = c.load_average()
    return run


def profile_hits(rig: Rig, wrk: str, script: Path, seconds: float) -> str:
    """py-spy samples of the ext_proc server while wrk sends 2 KB hits on 1 connection."""
    py_spy = c.require_tools(["py-spy"], install=False)["py-spy"]
    assert rig.stack is not None
    folded = rig.workdir / "hit-profile.txt"
    # --gil: only the thread holding the GIL, so time idle in epoll is not counted.
    command = [py_spy, "record", "--format", "raw", "--rate", "250", "--nonblocking", "--gil"]
    command += ["--pid", str(rig.stack.processes["extproc"].pid)]
    command += ["--duration", str(round(seconds)), "-o", str(folded)]
    profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        url = rig.urls[GATEWAY] + "/v1/messages"
        c.run_wrk(c.wrk_command(wrk, url, script, 1, 1, seconds - 1), seconds)
        profiler.wait(timeout=seconds + 30)
    finally:
        c.stop_all([profiler])
    return gb.summarize_profile(folded)


# -- report -----------------------------------------------------------------------------


def _p50(rounds: Sequence[c.Measured]) -> float:
    return c.median([r.wrk.p50_ms for r in rounds])


def _p99(rounds: Sequence[c.Measured]) -> float:
    return c.median([r.wrk.p99_ms for r in rounds])


def _cpu(rounds: Sequence[c.Measured], name: str, thread: str | None = None) -> str:
    return f"{c.median([r.us_per_request(name, thread) for r in rounds]):,.0f}"


def latency_table(run: Run) -> str:
    rows = []
    for (size, name), rounds in run.latency.items():
        base = run.latency[(size, BARE)]
        requests = sum(r.wrk.requests for r in rounds)
        seconds = sum(r.wrk.seconds for r in rounds)
        rows.append(
            [
                f"{size} ({run.nbytes[size]:,} B)",
                name,
                f"{requests:,}",
                f"{requests / seconds:,.0f}" if seconds else "-",
                f"{_p50(rounds):.3f}",
                f"{_p99(rounds):.3f}",
                f"{_p50(rounds) - _p50(base):+.3f}",
                f"{_p99(rounds) - _p99(base):+.3f}",
                " / ".join(f"{r.wrk.p50_ms:.3f}" for r in rounds),
            ]
        )
    header = ["request", "path", "requests", "req/s", "p50 ms", "p99 ms", "Δp50 ms", "Δp99 ms"]
    return c.table([*header, "p50 per round"], rows)


def cpu_table(run: Run) -> str:
    rows = []
    for (size, name), rounds in run.latency.items():
        server_name = SERVERS.get(name)
        rows.append(
            [
                size,
                name,
                _cpu(rounds, name),
                _cpu(rounds, server_name) if server_name else "-",
                _cpu(rounds, server_name, c.MAIN_THREAD) if server_name else "-",
            ]
        )
    note = (
        "CPU µs per request (medians over rounds, from /proc). The server's *main thread* "
        "runs the event loop and all Python code; gRPC's C-core polls in its own threads.\n\n"
    )
    header = ["request", "path", "front Envoy", "ext_proc server", "its main thread"]
    return note + c.table(header, rows)


def verdict_table(run: Run) -> str:
    rows = []
    for size in SIZES:
        added = _p50(run.latency[(size, GATEWAY)]) - _p50(run.latency[(size, BARE)])
        floor = _p50(run.latency[(size, NULL)]) - _p50(run.latency[(size, BARE)])
        target = TARGET_ADDED_MS[size]
        rows.append(
            [
                f"a {size} hit adds <= {target:g} ms p50 over bare Envoy",
                f"{added:+.3f} ms",
                "met" if added <= target else "**missed**",
                f"{floor:+.3f} ms",
            ]
        )
    return c.table(["target", "measured", "verdict", f"{NULL} (floor)"], rows)


def key_table(run: Run) -> str:
    rows = [
        [
            f"{k.size} ({k.nbytes:,} B)",
            k.what,
            str(len(k.samples)),
            f"{c.percentile(k.samples, 50):,.1f}",
            f"{c.percentile(k.samples, 99):,.1f}",
            f"{sum(k.samples) / len(k.samples):,.1f}",
        ]
        for k in run.keys
    ]
    rows.append(
        [
            f"answer ({run.answer_bytes:,} B)",
            "Entry.decode + orjson.dumps (a hit's answer)",
            str(len(run.entry)),
            f"{c.percentile(run.entry, 50):,.1f}",
            f"{c.percentile(run.entry, 99):,.1f}",
            f"{sum(run.entry) / len(run.entry):,.1f}",
        ]
    )
    return c.table(["body", "call", "calls", "p50 µs", "p99 µs", "mean µs"], rows)


def overhead_lines(run: Run) -> str:
    lines = []
    for size in SIZES:
        by = {k.what: c.percentile(k.samples, 50) for k in run.keys if k.size == size}
        key, shape = by[KEY], by[SHAPE]
        lines.append(
            f"- {size}: a hit computes the key ({key:,.0f} µs p50); a miss computes the key "
            f"and the hygiene shape ({key + shape:,.0f} µs p50), plus its store calls."
        )
    return "\n".join(lines)


def limits_lines(run: Run) -> str:
    """What bounds a hit's latency, from this run's numbers."""
    lines = []
    for size in SIZES:
        bare, hit, null = (run.latency[(size, name)] for name in (BARE, GATEWAY, NULL))
        floor, own = _p50(null) - _p50(bare), _p50(hit) - _p50(null)
        main_hit = c.median([r.us_per_request(SERVERS[GATEWAY], c.MAIN_THREAD) for r in hit])
        main_null = c.median([r.us_per_request(SERVERS[NULL], c.MAIN_THREAD) for r in null])
        key = next(
            c.percentile(k.samples, 50) for k in run.keys if k.size == size and k.what == KEY
        )
        lines.append(
            f"- {size}: any Python ext_proc serving the hit (the null hit server: gRPC, the "
            f"event loop, two phases) adds {floor:+.3f} ms p50 over bare Envoy, "
            f"{100 * floor / TARGET_ADDED_MS[size]:.0f}% of the {TARGET_ADDED_MS[size]:g} ms "
            f"target; the gateway's own code adds {own:+.3f} ms on top, with "
            f"{main_hit - main_null:,.0f} µs more main-thread CPU per request, of which the "
            f"cache key is {key:,.0f} µs."
        )
    return "What limits it:\n\n" + "\n".join(lines)


def render(run: Run) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    a = run.args
    method = (
        f"Through Envoy: wrk -t1 -c1, keep-alive, non-streaming POST /v1/messages; per case "
        f"{a.warmup:g} s warm-up, then {a.rounds} rounds of {a.seconds:g} s with the three "
        "paths alternating; p50/p99 are the medians over rounds. The cached answer is the "
        f"upstream's {run.answer_bytes:,}-byte message; *{BARE}* answers those exact bytes "
        "from a Lua filter after reading the request body (the gateway bootstrap minus "
        f"ext_proc); *{NULL}* is the gateway bootstrap against a do-nothing ext_proc "
        "that returns the same bytes as an ImmediateResponse on the body phase (same event "
        "loop and gRPC options as `extproc serve`): the floor for serving a hit from Python. "
        f"The ext_proc server counted {run.hits_counted:,} cache hits for the "
        f"{run.hits_sent:,} measured gateway requests (wrk counts only completed ones)."
    )
    return "\n\n".join(
        [
            "## Response cache (generated by bench/cache_bench.py)",
            f"Run {now}:\n\n```\n{run.command}\n```",
            c.machine_table(run.facts, run.load_before, run.load_after),
            method,
            "### Targets\n\n" + verdict_table(run),
            limits_lines(run),
            "### Hit latency through Envoy (1 connection)\n\n" + latency_table(run),
            cpu_table(run),
            "### Key computation (in-process, uvloop not involved; parsed body in, hex key out)"
            "\n\n" + key_table(run),
            overhead_lines(run),
            *(
                [
                    "### py-spy profile of ext_proc serving 2 KB hits (1 connection, `--gil`)\n\n"
                    + run.profile
                ]
                if run.profile
                else []
            ),
        ]
    )


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; prints only")
    parser.add_argument("--seconds", type=float, help="seconds per case per round (2)")
    parser.add_argument("--rounds", type=int, help="rounds per case (5)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per case (1)")
    parser.add_argument("--output", type=Path, help=f"report file (default {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--profile", action="store_true", help="also py-spy the 2 KB hits")
    parser.add_argument("--install-deps", action="store_true", help="apt-get install wrk")
    parser.add_argument("--null-hit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.warmup = args.warmup or 1.0
    planned = len(SIZES) * 3 * (args.warmup + args.rounds * args.seconds)
    planned += PROFILE_SECONDS if args.profile else 0
    if planned > TIME_LIMIT - 40:
        parser.error(
            f"the plan takes {planned:.0f} s of load; the run must end within {TIME_LIMIT} s"
        )
    args.write = not args.no_write and (args.output is not None or not args.quick)
    args.output = args.output or RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.null_hit:
        serve_null_hit(args.null_hit, args.answer)
        return 0

    def work() -> Run:
        tools = ["wrk", *(["py-spy"] if args.profile else [])]
        wrk = c.require_tools(tools, args.install_deps)["wrk"]
        with tempfile.TemporaryDirectory(prefix="cache-bench-") as workdir:
            return measure(args, wrk, Path(workdir))

    output = args.output if args.write else None
    return c.run_and_report("cache_bench", TIME_LIMIT, work, render, output, SECTION)


if __name__ == "__main__":
    raise SystemExit(main())
