"""Budgets and rate limits: what the checks add per request, and throughput with them on.

1. In-process, against a real `redis-server` (started here on a free port): the time
   of `extproc.policies.budget.spending.Spending.admit` (rate limits + budget reservation, one store
   round trip, before the provider call) and `settle` (after the answer) per request,
   under uvloop, for
   - *no rules*: the same gateway key, team and pipeline header, no budgets, no rate
     limits (what every request pays without the feature);
   - *budgets + rate limits*: a key, a team and a pipeline budget rule (USD and tokens)
     and requests/min + tokens/min limits per key and per team, high enough never to
     refuse;
   - the same rules on the memory store, for reference (Python cost without Redis).
   Cases alternate in blocks; p50/p99 over thousands of calls each.
   Target (issue 17): budget + rate-limit checks add <= 0.15 ms p50 (admit, rules vs no
   rules): one round trip (one EVALSHA over the store's pipelined hiredis connection).
2. Through Envoy: wrk with a 2 KB non-streaming POST /v1/messages and a gateway key,
   against a fast local upstream, through Envoy + `extproc serve` with `store: redis://`
   and the rules above, vs the same config without budgets and rate limits (both
   stacks up at once, runs alternating): req/s at 16 connections and p50 at 1 and 16.

    python bench/budget_bench.py            # ~55 s, writes the budget-bench section of RESULTS.md
    python bench/budget_bench.py --quick    # ~20 s smoke run, prints only
    python bench/budget_bench.py --redis-cpu               # redis-server CPU µs/request
    python bench/budget_bench.py --redis-cpu --callgrind   # its instructions/request

Every process started (redis-server, the upstream and two gateway Envoys, two ext_proc
servers) is stopped on exit, Ctrl-C or SIGTERM, and dies with the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import gateway_bench as gb
import orjson
import redis
import redis.asyncio as aioredis

from extproc import server, supervisor
from extproc.apis.tokens import estimate_input_tokens
from extproc.apis.usage import Usage
from extproc.config import parse_config
from extproc.policies.auth import Identity, hash_key, new_key
from extproc.policies.budget.spending import Spending
from extproc.store import Store, open_store
from extproc.store.pipe import command, evalsha
from extproc.store.redis import _SCRIPTS, RedisStore
from extproc.telemetry.metrics import Metrics
from tests.harness import Stack

KEY = new_key("bench")
PIPELINE_HEADER = "x-ci-pipeline-id"
PIPELINE = "bench-pipeline-1"
HEADERS = {**gb.CLIENT_HEADERS, "x-api-key": KEY, PIPELINE_HEADER: PIPELINE}
TARGET_ADDED_MS = 0.15
NONE, RULES, MEMORY = (
    "no rules (redis)",
    "budgets + rate limits (redis)",
    "budgets + rate limits (memory)",
)
OFF, ON = "Envoy + ext_proc, no budgets", "Envoy + ext_proc, budgets + rate limits"
PING = "PING through the store (`RedisStore.ping`)"
EVAL = "EVALSHA of `return 1` (plain redis-py asyncio client)"
PIPE = "EVALSHA of `return 1` through the store's pipe (`extproc.store.pipe`, hiredis)"
RESULTS = c.ROOT / "bench" / "RESULTS.md"
SECTION = "budget-bench"
TIME_LIMIT = 150

BUDGETS: dict[str, Any] = {
    "rules": [
        {"scope": "key", "id": "*", "window": "daily", "usd": 1_000_000, "tokens": 10**13},
        {"scope": "team", "id": "*", "window": "monthly", "usd": 1_000_000},
        {"scope": "pipeline", "id": "*", "window": "daily", "tokens": 10**13},
    ],
}
LIMIT = {"requests_per_minute": 10**9, "tokens_per_minute": 10**13}
RATE_LIMITS: dict[str, Any] = {"key": LIMIT, "team": LIMIT}


def gateway_settings(store: str, rules: bool) -> dict[str, Any]:
    """The auth (a config-declared key of team `ml`), store and, if `rules`, the limits."""
    settings: dict[str, Any] = {
        "store": store,
        "auth": {"required": True, "keys": [{"id": "bench", "hash": hash_key(KEY), "team": "ml"}]},
    }
    if rules:
        settings.update(budgets=BUDGETS, rate_limits=RATE_LIMITS)
    return settings


# -- in-process -------------------------------------------------------------------------


@dataclass
class Timings:
    admit: list[float] = field(default_factory=list)
    settle: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this process's CPU over the timed calls

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / len(self.admit) * 1e6 if self.admit else float("nan")

    @property
    def both(self) -> list[float]:
        return [a + s for a, s in zip(self.admit, self.settle, strict=True)]


async def _calls(spending: Spending, body: dict[str, Any], n: int, into: Timings) -> None:
    identity = Identity(source="key", key_id="bench", team="ml")
    headers = {PIPELINE_HEADER: PIPELINE}
    usage = Usage(input_tokens=512, output_tokens=420)
    cpu = time.process_time()
    for _ in range(n):
        run = spending.start(uuid.uuid4().hex, gb.MODEL, identity, headers, None)
        started = time.perf_counter_ns()
        await spending.admit(run, body, input_tokens=estimate_input_tokens(body, 2048))
        admitted = time.perf_counter_ns()
        await spending.settle(run, usage)
        into.admit.append((admitted - started) / 1e6)
        into.settle.append((time.perf_counter_ns() - admitted) / 1e6)
    into.cpu_seconds += time.process_time() - cpu


async def _in_process(redis_url: str, calls: int, blocks: int) -> InProcess:
    providers = gb.bench_config("http://127.0.0.1:1")["providers"]
    cases = {NONE: (redis_url, False), RULES: (redis_url, True), MEMORY: ("memory://", True)}
    spenders, stores = {}, []
    for name, (url, rules) in cases.items():
        config = parse_config({"providers": providers, **gateway_settings(url, rules)})
        stores.append(open_store(config.store))
        spenders[name] = Spending(config, stores[-1], Metrics())
    body = orjson.loads(gb.request_body(False))
    out = {name: Timings() for name in cases}
    for spending in spenders.values():  # warm-up: connections, script loading
        await _calls(spending, body, 200, Timings())
    for _ in range(blocks):
        for name, spending in spenders.items():
            await _calls(spending, body, calls // blocks, out[name])
    floor = await _floors(stores[0], redis_url, calls // 2)
    stats = await _server_side(redis_url, spenders[RULES], body, calls // 5)
    for store in stores:
        await store.close()
    return InProcess(out, floor, *stats)


async def _timed(call: Callable[[], Awaitable[object]], n: int) -> Floor:
    samples = []
    cpu = time.process_time()
    for _ in range(n):
        started = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return Floor(samples, (time.process_time() - cpu) / n * 1e6)


async def _floors(store: Store, redis_url: str, n: int) -> dict[str, Floor]:
    """What a round trip costs before any budget logic: PING through the store, and a
    trivial script through a plain redis-py asyncio client."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        sha = await client.script_load("return 1")
        out = {PING: await _timed(store.ping, n)}
        out[EVAL] = await _timed(lambda: client.evalsha(sha, 0), n)
        assert isinstance(store, RedisStore)
        pipe = store._pipe  # the connection the budget and rate-limit scripts use
        await pipe.call(command(b"SCRIPT", b"LOAD", b"return 1"))
        payload = evalsha(sha.encode() if isinstance(sha, str) else sha, 0, [], [])
        out[PIPE] = await _timed(lambda: pipe.call(payload), n)
    finally:
        await client.aclose()
    return out


async def _server_side(
    redis_url: str, spending: Spending, body: dict[str, Any], n: int
) -> tuple[float, float, dict[str, float]]:
    """(EVALSHA calls per request, server µs per EVALSHA, median server µs per script by
    name from SLOWLOG) over `n` requests with rules."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.config_resetstat()
        client.config_set("slowlog-log-slower-than", 0)  # log every command with its time
        client.config_set("slowlog-max-len", 4 * n)
        client.slowlog_reset()
        await _calls(spending, body, n, Timings())
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        entries = client.slowlog_get(4 * n)
        client.config_set("slowlog-log-slower-than", 10_000)
    finally:
        client.close()
    names = {script.sha.encode(): name for name, script in _SCRIPTS.items()}
    durations: dict[str, list[float]] = {}
    for entry in entries:
        words = entry["command"].split()
        if words[:1] == [b"EVALSHA"] and len(words) > 1 and words[1] in names:
            durations.setdefault(names[words[1]], []).append(float(entry["duration"]))
    scripts = {name: c.median(d) for name, d in durations.items()}
    return stats.get("calls", 0) / n, float(stats.get("usec_per_call", "nan")), scripts


@dataclass
class Floor:
    samples: list[float]  # ms
    cpu_us: float  # this process's CPU per call


@dataclass
class InProcess:
    timings: dict[str, Timings]
    floors: dict[str, Floor]
    evalsha_per_request: float
    evalsha_server_us: float
    script_server_us: dict[str, float]  # median per script (SLOWLOG)


def in_process(redis_url: str, calls: int) -> InProcess:
    server.install_event_loop_policy()
    return asyncio.run(_in_process(redis_url, calls, blocks=10))


# -- redis-server's CPU per request ------------------------------------------------------


@dataclass
class ServerCpu:
    """redis-server's own CPU (INFO cpu: getrusage, µs resolution) per admit + settle."""

    us_per_request: dict[str, float]  # case -> redis-server CPU µs per request
    calls_per_request: dict[str, float]  # with rules: Redis command -> calls per request
    evalsha_us: float  # with rules: INFO commandstats usec_per_call of EVALSHA


def _redis_cpu_us(client: redis.Redis) -> float:
    info = client.info("cpu")
    return (float(info["used_cpu_user"]) + float(info["used_cpu_sys"])) * 1e6


async def _server_cpu(redis_url: str, calls: int, blocks: int) -> ServerCpu:
    """Drive `Spending.start/admit/settle` against `redis_url` with and without rules,
    alternating in blocks, and read redis-server's CPU around each block."""
    providers = gb.bench_config("http://127.0.0.1:1")["providers"]
    spenders, stores = {}, []
    for name, rules in ((NONE, False), (RULES, True)):
        config = parse_config({"providers": providers, **gateway_settings(redis_url, rules)})
        stores.append(open_store(config.store))
        spenders[name] = Spending(config, stores[-1], Metrics())
    body = orjson.loads(gb.request_body(False))
    client = redis.Redis.from_url(redis_url)
    used = dict.fromkeys(spenders, 0.0)
    try:
        for spending in spenders.values():  # warm-up: connections, script loading
            await _calls(spending, body, 200, Timings())
        client.config_resetstat()
        for _ in range(blocks):
            for name, spending in spenders.items():
                before = _redis_cpu_us(client)
                await _calls(spending, body, calls // blocks, Timings())
                used[name] += _redis_cpu_us(client) - before
        stats = client.info("commandstats")
    finally:
        client.close()
        for store in stores:
            await store.close()
    n = calls // blocks * blocks
    # commandstats counts both cases' commands; the no-rules case makes none (no budgets,
    # no limits: no store call), so every call below is the rules case's.
    per_call = {
        k.removeprefix("cmdstat_"): v["calls"] / n
        for k, v in stats.items()
        if k.startswith("cmdstat_") and not k.startswith(("cmdstat_info", "cmdstat_config"))
    }
    evalsha = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", "nan"))
    return ServerCpu({k: v / n for k, v in used.items()}, per_call, evalsha)


def server_cpu(redis_url: str, calls: int) -> ServerCpu:
    server.install_event_loop_policy()
    return asyncio.run(_server_cpu(redis_url, calls, blocks=10))


def server_cpu_report(cpu: ServerCpu) -> str:
    rows = [[name, f"{us:,.1f}"] for name, us in cpu.us_per_request.items()]
    added = cpu.us_per_request[RULES] - cpu.us_per_request[NONE]
    calls = ", ".join(f"{name} {count:g}" for name, count in sorted(cpu.calls_per_request.items()))
    return (
        c.table(["case", "redis-server CPU µs/request (admit + settle)"], rows)
        + f"\n\nAdded by budgets + rate limits: {added:+,.1f} µs of redis-server CPU per "
        + f"request; EVALSHA {cpu.evalsha_us:.1f} µs per call (commandstats). Commands per "
        + f"request (scripts' own calls included): {calls}."
    )


def redis_cpu_main(args: argparse.Namespace) -> int:
    if args.callgrind:
        return redis_instructions_main(args)
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as workdir:
        process, url = c.start_redis(Path(workdir))
        try:
            print(server_cpu_report(server_cpu(url, args.calls)))
        finally:
            c.stop_all([process])
    return 0


# Under callgrind: redis-server's instructions per admit + settle, deterministic where
# CPU time on a shared machine is not (the figure to compare script changes by).


def _callgrind_total(path: Path) -> int:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise c.BenchError(f"{path}: no totals")


async def _instructions(url: str, pid: int, calls: int, out: Path) -> int:
    providers = gb.bench_config("http://127.0.0.1:1")["providers"]
    config = parse_config({"providers": providers, **gateway_settings(url, True)})
    store = open_store(config.store)
    spending = Spending(config, store, Metrics())
    body = orjson.loads(gb.request_body(False))
    control = ["callgrind_control"]
    try:
        await _calls(spending, body, 50, Timings())  # connection, scripts loaded
        await asyncio.to_thread(
            subprocess.run, [*control, "-z", str(pid)], check=True, stdout=subprocess.DEVNULL
        )
        await _calls(spending, body, calls, Timings())
        await asyncio.to_thread(
            subprocess.run,
            [*control, "-d", "bench", str(pid)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    finally:
        await store.close()
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda f: f.stat().st_mtime)
    return _callgrind_total(dumps[-1])


def redis_instructions_main(args: argparse.Namespace) -> int:
    """redis-server under valgrind's callgrind; instructions per admit + settle."""
    tools = c.require_tools(["valgrind", "callgrind_control"], args.install_deps)
    calls = min(args.calls, 500)  # ~20 ms per request under valgrind
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as workdir:
        out, port = Path(workdir) / "callgrind.out", c.free_port()
        command = [tools["valgrind"], "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [shutil.which("redis-server") or "redis-server", "--port", str(port)]
        command += ["--bind", "127.0.0.1", "--dir", workdir, "--save", "", "--hz", "1"]
        command += ["--appendonly", "no", "--protected-mode", "no"]
        process = supervisor.spawn(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not c.wait_port(port, process, 60):
                raise c.BenchError("redis-server under valgrind did not start")
            url = f"redis://127.0.0.1:{port}/0"
            server.install_event_loop_policy()
            total = asyncio.run(_instructions(url, process.pid, calls, out))
        finally:
            c.stop_all([process])
    print(
        f"redis-server: {total / calls:,.0f} instructions per request (admit + settle, "
        f"budgets + rate limits; callgrind over {calls} requests)"
    )
    return 0


# -- through Envoy ----------------------------------------------------------------------


@dataclass
class Rig:
    workdir: Path
    envoys: list[c.EnvoyProcess] = field(default_factory=list)
    stacks: dict[str, Stack] = field(default_factory=dict)
    redis: subprocess.Popen[bytes] | None = None
    redis_url: str = ""

    def close(self) -> None:
        for envoy in reversed(self.envoys):
            envoy.stop()
        for stack in self.stacks.values():
            stack.close()
        if self.redis is not None:
            c.stop_all([self.redis])

    def pids(self) -> dict[str, int]:
        pids = {
            f"{name} Envoy": stack.processes["envoy"].pid for name, stack in self.stacks.items()
        }
        pids |= {f"{name} server": s.processes["extproc"].pid for name, s in self.stacks.items()}
        assert self.redis is not None
        return {**pids, "redis-server": self.redis.pid, "upstream Envoy": self.envoys[0].pid}


def _request(url: str, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body, HEADERS)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def start_rig(rig: Rig) -> None:
    rig.redis, rig.redis_url = c.start_redis(rig.workdir)
    port = c.free_port()
    rig.envoys.append(
        c.EnvoyProcess(
            "upstream", gb.upstream_bootstrap(port, c.free_port(), c.free_port()), rig.workdir
        )
    )
    rig.envoys[0].start()
    for name, rules in ((OFF, False), (ON, True)):
        config = gb.bench_config(f"http://127.0.0.1:{port}")
        config.update(gateway_settings(rig.redis_url, rules))
        workdir = rig.workdir / ("on" if rules else "off")
        workdir.mkdir()
        rig.stacks[name] = stack = Stack(config, workdir)
        stack.start()
        status, body = _request(stack.url, "POST", "/v1/messages", gb.request_body(False))
        if status != 200 or body != gb.response_body():
            raise c.BenchError(f"{name}: probe answered {status}: {body[:300]!r}")


@contextlib.contextmanager
def running_rig(workdir: Path) -> Iterator[Rig]:
    rig = Rig(workdir)
    try:
        start_rig(rig)
        yield rig
    finally:
        rig.close()


def quota(stack: Stack) -> list[dict[str, Any]]:
    """The caller's budgets as the gateway reports them (GET /v1/gateway/quota)."""
    status, body = _request(stack.url, "GET", "/v1/gateway/quota", None)
    if status != 200:
        raise c.BenchError(f"quota: {status} {body[:300]!r}")
    budgets: list[dict[str, Any]] = orjson.loads(body)["budgets"]
    return budgets


# -- measurement ------------------------------------------------------------------------


@dataclass
class Run:
    command: str
    facts: dict[str, str]
    load_before: str
    args: argparse.Namespace
    load_after: str = ""
    calls: dict[str, Timings] = field(default_factory=dict)
    floor: InProcess | None = None
    load: dict[tuple[int, str], list[c.Measured]] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    server_cpu: ServerCpu | None = None


def measure(args: argparse.Namespace, wrk: str, workdir: Path) -> Run:
    command = ("python bench/budget_bench.py " + shlex.join(sys.argv[1:])).strip()
    run = Run(command, c.machine_facts({"wrk": wrk}), c.load_average(), args)
    with running_rig(workdir) as rig:
        print("in-process admit/settle ...", flush=True)
        run.floor = in_process(rig.redis_url, args.calls)
        run.calls = run.floor.timings
        run.server_cpu = server_cpu(rig.redis_url, args.calls // 2)
        print(server_cpu_report(run.server_cpu), flush=True)
        for name, timings in run.calls.items():
            print(f"  {name:32} admit p50 {c.percentile(timings.admit, 50):.3f} ms", flush=True)
        script = workdir / "post.lua"
        script.write_text(c.wrk_script("POST", gb.request_body(False), HEADERS), encoding="utf-8")
        cases = {name: (stack.url + "/v1/messages", script) for name, stack in rig.stacks.items()}
        for connections in (16, 1):
            c.wrk_rounds(wrk, cases, connections, args.warmup, 1)
            results = c.wrk_rounds(wrk, cases, connections, args.seconds, args.rounds, rig.pids())
            for name, rounds in results.items():
                run.load[(connections, name)] = rounds
                print(
                    f"  c={connections:<3} {name:42} {_rps(rounds):7,.0f} req/s "
                    f"p50 {_p50(rounds):6.3f} ms",
                    flush=True,
                )
        run.budgets = quota(rig.stacks[ON])
        if quota(rig.stacks[OFF]):
            raise c.BenchError("the stack without budgets reports budgets")
    run.load_after = c.load_average()
    return run


# -- report -----------------------------------------------------------------------------


def _rps(rounds: Sequence[c.Measured]) -> float:
    return c.median([r.wrk.rps for r in rounds])


def _p50(rounds: Sequence[c.Measured]) -> float:
    return c.median([r.wrk.p50_ms for r in rounds])


def _p99(rounds: Sequence[c.Measured]) -> float:
    return c.median([r.wrk.p99_ms for r in rounds])


def _cpu(rounds: Sequence[c.Measured], name: str) -> str:
    return f"{c.median([r.us_per_request(name) for r in rounds]):,.0f}"


def _q(samples: list[float]) -> list[str]:
    return [f"{c.percentile(samples, 50):.3f}", f"{c.percentile(samples, 99):.3f}"]


def calls_table(run: Run) -> str:
    base = run.calls[NONE]
    rows = []
    for name, t in run.calls.items():
        added = c.percentile(t.admit, 50) - c.percentile(base.admit, 50)
        added_both = c.percentile(t.both, 50) - c.percentile(base.both, 50)
        row = [name, f"{len(t.admit):,}", *_q(t.admit), *_q(t.settle), *_q(t.both)]
        rows.append([*row, f"{added:+.3f}", f"{added_both:+.3f}", f"{t.cpu_us:,.0f}"])
    header = ["case", "requests", "admit p50", "admit p99", "settle p50", "settle p99"]
    header += ["both p50", "both p99", "Δ admit p50", "Δ both p50", "CPU µs/request"]
    note = (
        "(ms; Δ is against *no rules* on the same redis-server; CPU is this Python "
        "process's, admit + settle, without redis-server's.)"
    )
    return c.table(header, rows) + "\n\n" + note


def floor_table(run: Run) -> str:
    """Where an admit's time goes: the round-trip floor, the server's script time."""
    assert run.floor is not None
    f = run.floor
    rows = [
        [name, *(f"{c.percentile(x.samples, q):.3f}" for q in (50, 99)), f"{x.cpu_us:,.0f}"]
        for name, x in f.floors.items()
    ]
    note = (
        "What one store round trip costs before any budget logic (same redis-server, uvloop; "
        "ms, and this process's CPU µs per call):\n\n"
    )
    tail = (
        f"\n\nWith rules on, each request makes {f.evalsha_per_request:.1f} EVALSHA calls "
        "(admit: one script deciding the rate limits and holding every budget; settle: one "
        "script settling every hold and correcting the token rate limits), and "
        f"redis-server spends {f.evalsha_server_us:.1f} µs inside each (INFO commandstats); "
        "median per script (SLOWLOG): "
        + ", ".join(f"{name} {us:.0f} µs" for name, us in sorted(f.script_server_us.items()))
        + "."
    )
    return note + c.table(["call", "p50 ms", "p99 ms", "CPU µs/call"], rows) + tail


def limits_lines(run: Run) -> str:
    """What bounds the added latency and the throughput, from this run's numbers."""
    assert run.floor is not None
    f, rules, none = run.floor, run.calls[RULES], run.calls[NONE]
    admit = c.percentile(rules.admit, 50)
    trip = c.percentile(f.floors[PIPE].samples, 50)
    server_ms = f.script_server_us.get("admit", f.evalsha_server_us) / 1000
    memory = c.percentile(run.calls[MEMORY].admit, 50)
    cpu_off = c.median([r.us_per_request(f"{OFF} server") for r in run.load[(16, OFF)]])
    cpu_on = c.median([r.us_per_request(f"{ON} server") for r in run.load[(16, ON)]])
    trips = f.evalsha_per_request
    return (
        "What limits it:\n\n"
        f"- admit ({admit:.3f} ms p50) is one Redis round trip: the store pipe's floor "
        f"({trip:.3f} ms for a script that does nothing) + redis-server running the admit "
        f"script (~{server_ms:.3f} ms, SLOWLOG median) + the rest "
        f"({admit - trip - server_ms:.3f} ms of Python around the call: the budget logic, "
        f"which on the memory store takes {memory:.3f} ms in all, script emulation included, "
        "and encoding the call's keys and arguments and decoding its reply).\n"
        f"- Per request the rules cost {rules.cpu_us - none.cpu_us:,.0f} µs more CPU in the "
        f"gateway process ({trips:.0f} round trips at ~{f.floors[PIPE].cpu_us:,.0f} µs of "
        "client CPU each, plus the budget logic). The ext_proc server runs Python on one "
        f"core, so its CPU per request bounds throughput: {cpu_off:,.0f} µs without budgets "
        f"vs {cpu_on:,.0f} µs with them at 16 connections (ceiling {1e6 / cpu_off:,.0f} vs "
        f"{1e6 / cpu_on:,.0f} req/s per busy core).\n"
        "- `settle` (one round trip: every hold settled and the token limits corrected in one "
        "script) runs when the ext_proc stream closes, after the last reply went to Envoy, "
        f"so its {c.percentile(rules.settle, 50):.3f} ms p50 costs CPU (throughput) but does "
        "not delay the answer; only admit is on the request's path."
    )


def load_table(run: Run) -> str:
    rows = []
    for (connections, name), rounds in run.load.items():
        base = run.load[(connections, OFF)]
        rows.append(
            [
                str(connections),
                name,
                f"{sum(r.wrk.requests for r in rounds):,}",
                f"{_rps(rounds):,.0f}",
                f"{_rps(rounds) / _rps(base):.2f}x",
                f"{_p50(rounds):.3f}",
                f"{_p99(rounds):.3f}",
                f"{_p50(rounds) - _p50(base):+.3f}",
                _cpu(rounds, f"{name} server"),
                _cpu(rounds, "redis-server"),
                " / ".join(f"{r.wrk.rps:,.0f}" for r in rounds),
            ]
        )
    header = ["conns", "path", "requests", "req/s", "vs off", "p50 ms", "p99 ms", "Δp50 ms"]
    header += ["ext_proc CPU µs/req", "redis CPU µs/req", "req/s per round"]
    return c.table(header, rows)


def verdict_table(run: Run) -> str:
    none, rules = run.calls[NONE], run.calls[RULES]
    admit = c.percentile(rules.admit, 50) - c.percentile(none.admit, 50)
    both = c.percentile(rules.both, 50) - c.percentile(none.both, 50)
    envoy = _p50(run.load[(1, ON)]) - _p50(run.load[(1, OFF)])
    rows = [
        [
            f"budget + rate-limit checks add <= {TARGET_ADDED_MS} ms p50 (admit, in-process)",
            f"{admit:+.3f} ms",
            "met" if admit <= TARGET_ADDED_MS else "**missed**",
        ],
        [
            "the same counting the settle after the answer (admit + settle)",
            f"{both:+.3f} ms",
            "met" if both <= TARGET_ADDED_MS else "**missed**",
        ],
        [
            "end to end through Envoy, p50 at 1 connection (reference)",
            f"{envoy:+.3f} ms",
            "-",
        ],
        [
            "throughput with them on, 16 connections",
            f"{_rps(run.load[(16, ON)]):,.0f} req/s "
            f"({_rps(run.load[(16, ON)]) / _rps(run.load[(16, OFF)]):.2f}x of off)",
            "-",
        ],
    ]
    return c.table(["target", "measured", "verdict"], rows)


def budgets_line(run: Run) -> str:
    parts = [f"{b['budget']} {b['scope']}: {b['used']:,} {b['metric']} used" for b in run.budgets]
    return (
        "Budgets were live: after the run the gateway's quota endpoint reported "
        + "; ".join(parts)
        + " (every request reserved, then settled at 512 input + 420 output tokens)."
    )


def render(run: Run) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    a = run.args
    method = (
        f"In-process: {a.calls:,} requests per case after 200 warm-up calls, in 10 blocks "
        "alternating between cases, each `Spending.start` + `admit` (timed) + `settle` (timed) "
        f"with a 2 KB body, model {gb.MODEL}, key `bench` of team `ml` and a pipeline header, "
        "under uvloop, one redis-server on loopback (no persistence). Rules: "
        f"`budgets: {orjson.dumps(BUDGETS).decode()}`, "
        f"`rate_limits: {orjson.dumps(RATE_LIMITS).decode()}`. Through Envoy: both stacks "
        f"share the redis-server and the upstream (an Envoy answering 2 KB from Lua); per "
        f"connection count {a.warmup:g} s warm-up, then {a.rounds} rounds of {a.seconds:g} s "
        "per path, alternating; figures are medians over rounds."
    )
    return "\n\n".join(
        [
            "## Budgets and rate limits (generated by bench/budget_bench.py)",
            f"Run {now}:\n\n```\n{run.command}\n```",
            c.machine_table(run.facts, run.load_before, run.load_after),
            method,
            "### Targets\n\n" + verdict_table(run),
            "### Admit and settle per request (in-process, ms)\n\n" + calls_table(run),
            floor_table(run),
            "redis-server's own CPU (INFO cpu) per request, in-process, cases alternating:\n\n"
            + server_cpu_report(run.server_cpu)
            if run.server_cpu
            else "",
            limits_lines(run),
            "### Through Envoy (2 KB POST /v1/messages)\n\n" + load_table(run),
            budgets_line(run),
        ]
    )


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; prints only")
    parser.add_argument("--calls", type=int, help="in-process requests per case (5000)")
    parser.add_argument("--seconds", type=float, help="seconds per path per round (3)")
    parser.add_argument("--rounds", type=int, help="rounds per path (3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per path (1)")
    parser.add_argument("--output", type=Path, help=f"report file (default {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--install-deps", action="store_true", help="apt-get install wrk")
    parser.add_argument(
        "--redis-cpu",
        action="store_true",
        help="only redis-server's CPU per admit + settle (in-process, ~10 s); prints only",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="with --redis-cpu: redis-server's instructions per request under callgrind",
    )
    args = parser.parse_args(argv)
    args.calls = args.calls or (500 if args.quick else 5000)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.warmup = args.warmup or 1.0
    planned = 2 * 2 * (args.warmup + args.rounds * args.seconds) + args.calls * 4 * 0.002
    if planned > TIME_LIMIT - 40:
        parser.error(f"the plan takes {planned:.0f} s; the run must end within {TIME_LIMIT} s")
    args.write = not args.no_write and (args.output is not None or not args.quick)
    args.output = args.output or RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redis_cpu:
        return redis_cpu_main(args)

    def work() -> Run:
        wrk = c.require_tools(["wrk"], args.install_deps)["wrk"]
        with tempfile.TemporaryDirectory(prefix="budget-bench-") as workdir:
            return measure(args, wrk, Path(workdir))

    output = args.output if args.write else None
    return c.run_and_report("budget_bench", TIME_LIMIT, work, render, output, SECTION)


if __name__ == "__main__":
    raise SystemExit(main())
