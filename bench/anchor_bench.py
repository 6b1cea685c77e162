"""Issue 17's anchor: ours with every policy on, beside bare Envoy and the official gateway.

One run, one upstream (nginx answering a 2 KB Anthropic message, or an SSE stream whose
first delta comes at once and the rest 2 ms later), these paths:

- *upstream direct*: wrk straight to nginx (the floor);
- *bare Envoy*: our Envoy bootstrap without ext_proc, in front of nginx;
- *official gateway*: `claude gateway` (../shared/anchors/claude-gateway/start.sh), bearer token;
- *ours*: Envoy + `extproc serve` with every policy on: gateway key, model allow-list,
  guard on the request and the answer, response cache (miss path: every request carries a
  token no other request used), budgets and rate limits in the in-memory store, audit to a
  file, Prometheus metrics;
- *ours, Redis*: the same with a bench-started redis-server as the store; *ours, Redis, no
  budget/rate limit* isolates what budgets + rate limits add; *ours, Redis, --workers 2*.

Measured, paths alternating round by round so background load drifts over all alike:
2 KB p50 at 1 connection and req/s at 16 (wrk, closed loop, keep-alive), CPU per request
of each path's own processes from /proc (nginx and wrk excluded; Redis and the official
gateway's Postgres shown apart), time to first streamed token, a cache hit against the
official gateway passing the same request through, and the 117 KB Claude Code request.
The report (machine, load before/after, tables, each target met/missed) replaces the
`anchor-bench` section of bench/RESULTS.md.

    python bench/anchor_bench.py             # full run (~6 min), writes RESULTS.md
    python bench/anchor_bench.py --quick     # ~1 min smoke run, prints only
    python bench/anchor_bench.py --profile   # also py-spy ours' ext_proc (2 KB x16, 117 KB x1)

Needs wrk, nginx-light (its echo module streams SSE) and redis-server from Debian, npm and
PostgreSQL for the official gateway (start.sh installs them once), py-spy for --profile;
--install-deps apt/pip-installs wrk, nginx-light, redis-server and py-spy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import budget_bench as bb
import gateway_bench as gb
import orjson

from extproc import supervisor
from extproc.policies.auth import hash_key, new_key
from tests.data.claude_code_request import build_request
from tests.harness import Stack

SECTION = "anchor-bench"
RESULTS = c.ROOT / "bench" / "RESULTS.md"
TIME_LIMIT = 900  # seconds: the whole full run (first start of the official gateway included)
ANCHOR_DIR = Path("shared") / "anchors" / "claude-gateway"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
KEY = new_key("bench")
PLACEHOLDER = b"Q" * c.TOKEN_LETTERS
SSE_QUERY = "?bench_sse=1"  # both gateways forward the query string; nginx streams on it
PROFILE_DIR = Path(tempfile.gettempdir())  # py-spy's folded stacks are kept there

DIRECT, BARE, OFFICIAL = "upstream direct (nginx)", "bare Envoy", "official gateway"
OURS, REDIS = "ours, all policies (memory store)", "ours, all policies (Redis store)"
REDIS_OPEN, WORKERS = "ours, Redis, no budget/rate limit", "ours, Redis, --workers 2"
OURS_ALL = (OURS, REDIS, REDIS_OPEN, WORKERS)
HIT = "ours, cache hit (memory store)"
CACHE_METRIC = "extproc_cache_requests_total"
HIT_METRIC = CACHE_METRIC + '{result="hit"}'

TARGET_CPU_US = 1200.0
TARGET_LIMITS_MS = 0.15
TARGET_LARGE_MS = 2.0

# -- bodies -----------------------------------------------------------------------------


def small_body(stream: bool) -> c.Marked:
    """gateway_bench's 2 KB request with the per-request token at the start of its text."""
    document = orjson.loads(gb.request_body(stream))
    text = document["messages"][0]["content"]
    document["messages"][0]["content"] = PLACEHOLDER.decode() + text[len(PLACEHOLDER) :]
    return c.Marked.of(orjson.dumps(document), PLACEHOLDER)


def large_body() -> c.Marked:
    """The recorded-shape 117 KB Claude Code request, the token in its last user turn (where
    a new turn differs from the previous one)."""
    document = build_request()
    document["stream"] = False
    block = document["messages"][-1]["content"][-1]
    block["text"] = f"Turn {PLACEHOLDER.decode()}. " + block["text"]
    return c.Marked.of(orjson.dumps(document), PLACEHOLDER)


# -- the upstream: nginx ----------------------------------------------------------------


def _nginx_string(data: bytes) -> str:
    text = data.decode()
    if any(ch in text for ch in "'$\\"):
        raise c.BenchError("the canned body cannot be written as an nginx string")
    return "'" + text.replace("\n", "\\n") + "'"


def nginx_conf(port: int, workdir: Path) -> str:
    """One process, keep-alive, 2 KB JSON on /v1/messages, SSE when `SSE_QUERY` is set."""
    first, rest = gb.sse_parts()
    temp = " ".join(f"{kind}_temp_path {workdir}/nginx-{kind};" for kind in _NGINX_TEMPS)
    return _NGINX % {
        "module": ECHO_MODULE,
        "workdir": workdir,
        "temp": temp,
        "port": port,
        "json": _nginx_string(gb.response_body()),
        "first": _nginx_string(first),
        "rest": _nginx_string(rest),
        "delay": f"{gb.SSE_REST_DELAY:.3f}",
    }


_NGINX_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_NGINX = """
load_module %(module)s;
daemon off;
master_process off;
pid %(workdir)s/nginx.pid;
error_log %(workdir)s/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_body_buffer_size 512k;
  client_max_body_size 16m;
  %(temp)s
  server {
    listen 127.0.0.1:%(port)d backlog=4096;
    location / {
      if ($arg_bench_sse) { rewrite ^ /_sse last; }
      default_type application/json;
      return 200 %(json)s;
    }
    location = /_sse {
      internal;
      default_type text/event-stream;
      echo_read_request_body;
      echo -n %(first)s;
      echo_flush;
      echo_sleep %(delay)s;
      echo -n %(rest)s;
    }
  }
}
"""


def start_nginx(nginx: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    if not ECHO_MODULE.exists():
        raise c.BenchError(f"{ECHO_MODULE} is missing: apt-get install -y nginx-light")
    port = c.free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(port, workdir), encoding="utf-8")
    log_path = workdir / "nginx.log"
    with log_path.open("ab") as log:
        command = [nginx, "-c", str(conf), "-p", str(workdir)]
        process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
    if not c.wait_port(port, process, 10):
        c.stop_all([process])
        raise c.BenchError(f"nginx did not start:\n{log_path.read_text()}")
    return process, f"http://127.0.0.1:{port}"


# -- the official gateway ---------------------------------------------------------------


def anchor() -> Path:
    """../shared/anchors/claude-gateway from the project root (or from a worktree's parent)."""
    for parent in c.ROOT.parents:
        if (parent / ANCHOR_DIR / "start.sh").exists():
            return parent / ANCHOR_DIR
    raise c.BenchError(f"no {ANCHOR_DIR}/start.sh beside the project or above it")


@dataclass
class Official:
    """`claude gateway` started by the anchor's start.sh; `stop()` runs stop.sh."""

    base: str
    token: str
    state: Path

    @classmethod
    def start(cls, upstream: str) -> Official:
        script = anchor() / "start.sh"
        env = {**os.environ, "PY": sys.executable}
        command = ["bash", str(script), upstream, str(c.free_port())]
        states = set(Path(tempfile.gettempdir()).glob("anchor-cgw.*"))
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        values = dict(ln.split("=", 1) for ln in result.stdout.splitlines() if "=" in ln)
        if result.returncode != 0 or not {"BASE", "TOKEN", "STATE"} <= values.keys():
            # start.sh prints STATE last: stop whatever a failed start left running
            for state in set(Path(tempfile.gettempdir()).glob("anchor-cgw.*")) - states:
                cls("", "", state).stop()
            raise c.BenchError(f"the official gateway did not start:\n{result.stderr[-2000:]}")
        return cls(values["BASE"], values["TOKEN"], Path(values["STATE"]))

    @property
    def pid(self) -> int:
        return int((self.state / "gateway.pid").read_text().split()[0])

    @property
    def postgres_pid(self) -> int:
        return int((self.state / "pg" / "postmaster.pid").read_text().split()[0])

    @property
    def version(self) -> str:
        pid = self.pid
        binary = os.readlink(f"/proc/{pid}/exe")
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        return result.stdout.strip() or "unknown"

    def stop(self) -> None:
        command = ["bash", str(anchor() / "stop.sh"), str(self.state)]
        subprocess.run(command, timeout=60, check=False)
        shutil.rmtree(self.state, ignore_errors=True)


# -- ours -------------------------------------------------------------------------------


def ours_config(upstream: str, store: str, limits: bool) -> dict[str, Any]:
    """Every policy on: key, allow-list, guard (request and answer), cache, budgets and
    rate limits (unless not `limits`), audit to a file (the Stack's default), metrics."""
    config = gb.bench_config(upstream)
    config.update(
        store=store,
        auth={"required": True, "keys": [{"id": "bench", "hash": hash_key(KEY), "team": "ml"}]},
        teams={"ml": {"models": ["claude-*"]}},
        profiles={"default": {"models": ["claude-sonnet-*"], "cache": {"enabled": True}}},
        guard={},
    )
    if limits:
        config.update(budgets=bb.BUDGETS, rate_limits=bb.RATE_LIMITS)
    return config


@dataclass(frozen=True)
class Endpoint:
    url: str
    headers: dict[str, str]


@dataclass
class Rig:
    """Every process of the bench and how to reach (and meter) each path."""

    workdir: Path
    helpers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    envoys: list[c.EnvoyProcess] = field(default_factory=list)
    stacks: dict[str, Stack] = field(default_factory=dict)
    official: Official | None = None
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> name -> root pid

    def close(self) -> None:
        if self.official is not None:
            self.official.stop()
        for envoy in reversed(self.envoys):
            envoy.stop()
        for stack in self.stacks.values():
            stack.close()
        c.stop_all(list(self.helpers.values()))


def _start_ours(rig: Rig, path: str, upstream: str, store: str, limits: bool) -> Stack:
    workdir = rig.workdir / path.translate({ord(ch): "-" for ch in " ,()/"})
    workdir.mkdir()
    stack = rig.stacks[path] = Stack(ours_config(upstream, store, limits), workdir)
    stack.start_extproc(*(["--workers", "2"] if path == WORKERS else []))
    stack.start_envoy()
    rig.endpoints[path] = Endpoint(stack.url, {**gb.CLIENT_HEADERS, "x-api-key": KEY})
    rig.groups[path] = {
        "Envoy": stack.processes["envoy"].pid,
        "ext_proc": stack.processes["extproc"].pid,
    }
    return stack


def _start_bare(rig: Rig, ours: Stack) -> None:
    """Ours' Envoy bootstrap without ext_proc, in front of the same upstream."""
    port = c.free_port()
    bootstrap = gb.bare_bootstrap(ours.bootstrap(), port)
    rig.envoys.append(c.EnvoyProcess("bare", bootstrap, rig.workdir).start())
    rig.endpoints[BARE] = Endpoint(f"http://127.0.0.1:{port}", dict(gb.CLIENT_HEADERS))
    rig.groups[BARE] = {"Envoy": rig.envoys[-1].pid}


def _start_official(rig: Rig, upstream: str) -> None:
    print("starting the official gateway (first time: npm + PostgreSQL installs)", flush=True)
    rig.official = official = Official.start(upstream)
    bearer = {"authorization": f"Bearer {official.token}"}
    headers = {k: v for k, v in gb.CLIENT_HEADERS.items() if k != "x-api-key"}
    rig.endpoints[OFFICIAL] = Endpoint(official.base, {**headers, **bearer})
    rig.groups[OFFICIAL] = {"gateway": official.pid, "Postgres": official.postgres_pid}


def start_rig(rig: Rig, tools: Mapping[str, str]) -> None:
    nginx, upstream = start_nginx(tools["nginx"], rig.workdir)
    rig.helpers["nginx"] = nginx
    redis, redis_url = c.start_redis(rig.workdir)
    rig.helpers["redis-server"] = redis
    rig.endpoints[DIRECT] = Endpoint(upstream, dict(gb.CLIENT_HEADERS))
    rig.groups[DIRECT] = {}
    ours = _start_ours(rig, OURS, upstream, "memory://", limits=True)
    for db, path in enumerate((REDIS, REDIS_OPEN, WORKERS), start=1):
        _start_ours(rig, path, upstream, f"{redis_url.removesuffix('/0')}/{db}", path != REDIS_OPEN)
        rig.groups[path]["redis-server"] = redis.pid
    _start_bare(rig, ours)
    _start_official(rig, upstream)
    order = (DIRECT, BARE, OFFICIAL, *OURS_ALL)
    rig.endpoints = {path: rig.endpoints[path] for path in order}


@contextlib.contextmanager
def running_rig(workdir: Path, tools: Mapping[str, str]) -> Iterator[Rig]:
    rig = Rig(workdir)
    try:
        start_rig(rig, tools)
        yield rig
    finally:
        rig.close()


# -- checks -----------------------------------------------------------------------------

_python_salt = [26**4 - 1]


def next_salt() -> int:
    """A salt for Python-made tokens, disjoint from the wrk runs' (which count up from 1)."""
    _python_salt[0] -= 1
    return _python_salt[0]


def post(endpoint: Endpoint, body: bytes, query: str = "") -> tuple[int, dict[str, str], bytes]:
    host, port = endpoint.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v1/messages" + query, body, endpoint.headers)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def probe(rig: Rig) -> None:
    """Each path answers both shapes from nginx; ours marks its answers (and audits them)."""
    for path, endpoint in rig.endpoints.items():
        for stream, expected in ((False, gb.response_body()), (True, b"message_stop")):
            body = small_body(stream).body(next_salt(), 0)
            status, headers, answer = post(endpoint, body, SSE_QUERY if stream else "")
            if status != 200 or expected not in answer:
                raise c.BenchError(f"{path}: unexpected reply {status}: {answer[:300]!r}")
            if ("x-gateway-request-id" in headers) != (path in OURS_ALL):
                raise c.BenchError(f"{path}: x-gateway-request-id present: {headers}")
    for path in OURS_ALL:
        records = rig.stacks[path].audit_records(wait_for=2)
        if not records or "guard" not in records[-1] or records[-1].get("cache") != "miss":
            raise c.BenchError(f"{path}: the audit record lacks guard or cache miss: {records}")


def check_after(rig: Rig) -> list[str]:
    """What the policies did during the run: cache results (metrics), audit records written,
    budgets charged (the quota endpoint)."""
    lines = []
    for path in OURS_ALL:
        stack = rig.stacks[path]
        text = stack.metrics_text()
        miss, hit = (_metric(text, f'{CACHE_METRIC}{{result="{r}"}}') for r in ("miss", "hit"))
        with stack.audit_path.open("rb") as audit:
            records = sum(1 for _ in audit)
        lines.append(
            f"- {path}: cache misses {miss:,.0f}, hits {hit:,.0f}; {records:,} audit records; "
            f"{_budgets(rig.endpoints[path])}"
        )
    return lines


def _budgets(endpoint: Endpoint) -> str:
    host, port = endpoint.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/v1/gateway/quota", headers=endpoint.headers)
        reply = connection.getresponse()
        status, body = reply.status, reply.read()
    finally:
        connection.close()
    if status != 200:
        return f"quota endpoint answered {status}"
    budgets = orjson.loads(body).get("budgets", [])
    used = [f"{b['budget']} {b['scope']} {_amount(b['used'])} {b['metric']}" for b in budgets]
    return "budgets used: " + ("; ".join(used) or "none (no rules)")


def _amount(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4f}"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# -- load runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One wrk run of one path and the CPU seconds of that path's processes."""

    wrk: c.WrkResult
    cpu: dict[str, float]


class Loader:
    """wrk runs, each with a fresh token salt, metered by process tree."""

    def __init__(self, rig: Rig, wrk: str) -> None:
        self.rig, self.wrk, self.salt = rig, wrk, 0

    def script(self, path: str, body: c.Marked) -> Path:
        self.salt += 1
        target = self.rig.workdir / f"wrk-{self.salt}.lua"
        text = c.unique_wrk_script(body, self.salt, self.rig.endpoints[path].headers)
        target.write_text(text, encoding="utf-8")
        return target

    def run(self, path: str, body: c.Marked, connections: int, seconds: float) -> Sample:
        """wrk against `path`, every request with a token of its own."""
        return self._metered(path, self.script(path, body), connections, seconds)

    def fixed(self, path: str, body: bytes, connections: int, seconds: float) -> Sample:
        """The same request every time (the cache-hit case)."""
        script = self.rig.workdir / f"fixed-{list(self.rig.endpoints).index(path)}.lua"
        script.write_text(c.wrk_script("POST", body, self.rig.endpoints[path].headers))
        return self._metered(path, script, connections, seconds)

    def _metered(self, path: str, script: Path, connections: int, seconds: float) -> Sample:
        url = self.rig.endpoints[path].url + "/v1/messages"
        threads = 1 if connections == 1 else 2
        command = c.wrk_command(self.wrk, url, script, threads, connections, seconds)
        trees = {name: c.process_tree(pid) for name, pid in self.rig.groups[path].items()}
        before = {name: c.tree_cpu_seconds(pids) for name, pids in trees.items()}
        result = c.run_wrk(command, seconds)
        cpu = {name: c.tree_cpu_seconds(pids) - before[name] for name, pids in trees.items()}
        return Sample(result, cpu)


def alternate(
    paths: Sequence[str], rounds: int, run: Callable[[str], Sample], label: str
) -> dict[str, list[Sample]]:
    """`rounds` rounds of one run per path (A/B/C, A/B/C, ...)."""
    out: dict[str, list[Sample]] = {path: [] for path in paths}
    for number in range(1, rounds + 1):
        for path in paths:
            sample = run(path)
            out[path].append(sample)
            print(
                f"  {label} round {number}  {path:38} {sample.wrk.rps:8.0f} req/s  "
                f"p50 {sample.wrk.p50_ms:6.3f} ms",
                flush=True,
            )
    return out


# -- time to first token ----------------------------------------------------------------


class SseClient:
    """One keep-alive connection timing the first content_block_delta; a new token per call
    (ours would otherwise answer from its cache)."""

    def __init__(self, path: str, endpoint: Endpoint) -> None:
        self.path, self.failures, self.whole = path, 0, 0
        self.host, self.port = endpoint.url.removeprefix("http://").split(":")
        lines = [f"POST /v1/messages{SSE_QUERY} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in endpoint.headers.items()]
        self.head = "".join(lines).encode()
        self.body, self.salt, self.counter = small_body(True), next_salt(), 0
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, int(self.port)), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def ttft_ms(self) -> float | None:
        """Milliseconds to the first delta; None (and a new connection) if the call failed."""
        try:
            return self._ttft_ms()
        except (OSError, c.BenchError) as exc:
            self.failures += 1
            if self.failures > 3:
                raise c.BenchError(f"{self.path}: streamed requests fail: {exc!r}") from exc
            print(f"  {self.path}: streamed request failed ({exc!r}); reconnecting", flush=True)
            self.sock.close()
            self.sock = self._connect()
            return None

    def _ttft_ms(self) -> float:
        self.counter += 1
        body = self.body.body(self.salt, self.counter)
        request = self.head + f"content-length: {len(body)}\r\n\r\n".encode() + body
        started = time.perf_counter_ns()
        self.sock.sendall(request)
        buffer, first = b"", 0
        while not _complete(buffer):
            data = self.sock.recv(65536)
            if not data:
                raise c.BenchError("the connection closed mid-stream")
            buffer += data
            if not first and b"content_block_delta" in buffer:
                first = time.perf_counter_ns()
        if not buffer.startswith(b"HTTP/1.1 200") or b"message_stop" not in buffer:
            raise c.BenchError(f"bad streamed reply: {buffer[:300]!r}")
        head = buffer[: buffer.find(b"\r\n\r\n")].lower()
        self.whole += b"transfer-encoding: chunked" not in head
        return (first - started) / 1e6

    def close(self) -> None:
        self.sock.close()


def _complete(buffer: bytes) -> bool:
    """A whole HTTP/1.1 response: chunked (Envoy, nginx), or with a content-length (the
    official gateway, when the upstream's stream has ended before it answers)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in buffer[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(buffer) >= end + 4 + int(value)
    return buffer.endswith(b"\r\n0\r\n\r\n")


@dataclass
class Ttft:
    samples: dict[str, list[float]]
    failures: dict[str, int]
    whole: dict[str, int]  # answers sent in one piece with a content-length (not streamed)


def measure_ttft(rig: Rig, paths: Sequence[str], samples: int, budget: float) -> Ttft:
    """TTFT samples per path, paths alternating so background noise hits all alike."""
    clients = [SseClient(path, rig.endpoints[path]) for path in paths]
    out: dict[str, list[float]] = {path: [] for path in paths}
    try:
        for _ in range(20):
            for client in clients:
                client.ttft_ms()
        for client in clients:
            client.whole = 0
        deadline = time.monotonic() + budget
        while len(out[paths[0]]) < samples and time.monotonic() < deadline:
            for client in clients:
                if (value := client.ttft_ms()) is not None:
                    out[client.path].append(value)
    finally:
        for client in clients:
            client.close()
    failures = {client.path: client.failures for client in clients}
    return Ttft(out, failures, {client.path: client.whole for client in clients})


# -- profile ----------------------------------------------------------------------------


def profile_ours(rig: Rig, loader: Loader, case: ProfileCase, seconds: float) -> str:
    """py-spy (with subprocesses) on ours' ext_proc while wrk drives `case` through it; the
    folded stacks are kept in `profile_path(case)`."""
    py_spy = c.require_tools(["py-spy"], install=False)["py-spy"]
    out = profile_path(case)
    command = [py_spy, "record", "--format", "raw", "--rate", "250", "--nonblocking"]
    command += ["--subprocesses", "--pid", str(rig.groups[OURS]["ext_proc"])]
    command += ["--duration", str(round(seconds)), "-o", str(out)]
    out.unlink(missing_ok=True)
    profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        loader.run(OURS, case.body(), case.connections, seconds - 1)
        profiler.wait(timeout=seconds + 30)
    finally:
        c.stop_all([profiler])
    if not out.exists():
        raise c.BenchError("py-spy wrote no profile")
    return gb.summarize_profile(out)


@dataclass(frozen=True)
class ProfileCase:
    name: str
    slug: str
    body: Callable[[], c.Marked]
    connections: int


PROFILES = (
    ProfileCase("2 KB, 16 connections", "2kb-c16", lambda: small_body(False), 16),
    ProfileCase("117 KB Claude Code request, 1 connection", "117kb-c1", large_body, 1),
)


def profile_path(case: ProfileCase) -> Path:
    return PROFILE_DIR / f"anchor_bench_profile_{case.slug}.folded"


# -- the run ----------------------------------------------------------------------------


@dataclass
class Run:
    command: str
    facts: dict[str, str]
    load_before: str
    args: argparse.Namespace
    load_after: str = ""
    one: dict[str, list[Sample]] = field(default_factory=dict)
    sixteen: dict[str, list[Sample]] = field(default_factory=dict)
    ttft: Ttft = field(default_factory=lambda: Ttft({}, {}, {}))
    hit: dict[str, list[Sample]] = field(default_factory=dict)
    large: dict[str, list[Sample]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)


ONE_PATHS = (DIRECT, BARE, OFFICIAL, OURS, REDIS, REDIS_OPEN)
SIXTEEN_PATHS = (DIRECT, BARE, OFFICIAL, *OURS_ALL)
TTFT_PATHS = (DIRECT, BARE, OFFICIAL, OURS, REDIS)
LARGE_PATHS = (DIRECT, BARE, OFFICIAL, OURS)


def warm(
    loader: Loader, paths: Sequence[str], body: c.Marked, seconds: float, conns: Sequence[int]
) -> None:
    """A wrk run per path and connection count, unmeasured (none when `seconds` is 0)."""
    for connections in conns if seconds > 0 else ():
        for path in paths:
            loader.run(path, body, connections, seconds)


def _facts(tools: Mapping[str, str]) -> dict[str, str]:
    facts = c.machine_facts({"wrk": tools["wrk"], "redis-server": tools["redis-server"]})
    nginx = subprocess.run([tools["nginx"], "-v"], capture_output=True, text=True, timeout=30)
    facts["nginx"] = nginx.stderr.strip()
    return facts


def measure(args: argparse.Namespace, tools: dict[str, str], workdir: Path) -> Run:
    command = ("python bench/anchor_bench.py " + shlex.join(sys.argv[1:])).strip()
    run = Run(command, _facts(tools), c.load_average(), args)
    small, large = small_body(False), large_body()
    with running_rig(workdir, tools) as rig:
        assert rig.official is not None
        run.facts["official gateway"] = rig.official.version
        probe(rig)
        loader = Loader(rig, tools["wrk"])
        print("warming up", flush=True)
        warm(loader, SIXTEEN_PATHS, small, args.warmup, (1, 16))
        d, rounds = args.duration, args.rounds
        run.one = alternate(ONE_PATHS, rounds, lambda p: loader.run(p, small, 1, d), "2 KB c=1")
        run.sixteen = alternate(
            SIXTEEN_PATHS, rounds, lambda p: loader.run(p, small, 16, d), "2 KB c=16"
        )
        run.ttft = measure_ttft(rig, TTFT_PATHS, args.ttft_samples, args.ttft_budget)
        run.hit = measure_hit(rig, loader, args)
        warm(loader, LARGE_PATHS, large, args.warmup, (1,))
        run.large = alternate(LARGE_PATHS, rounds, lambda p: loader.run(p, large, 1, d), "117 KB")
        for case in PROFILES if args.profile else ():
            run.profiles[case.name] = profile_ours(rig, loader, case, max(d, 5.0))
        run.checks = check_after(rig)
    run.load_after = c.load_average()
    return run


def measure_hit(rig: Rig, loader: Loader, args: argparse.Namespace) -> dict[str, list[Sample]]:
    """The same 2 KB request: a cache hit at ours (primed once) vs the official gateway
    passing it through (it has no cache), and bare Envoy for reference."""
    body = small_body(False).body(next_salt(), 0)
    status, _, _ = post(rig.endpoints[OURS], body)
    if status != 200:
        raise c.BenchError(f"priming the cache failed: {status}")
    rig.endpoints[HIT], rig.groups[HIT] = rig.endpoints[OURS], rig.groups[OURS]
    paths = (BARE, OFFICIAL, HIT)
    for path in paths if args.warmup > 0 else ():
        loader.fixed(path, body, 1, args.warmup)
    hits = rig.stacks[OURS].metrics_text()
    out = alternate(paths, args.rounds, lambda p: loader.fixed(p, body, 1, args.duration), "hit")
    served = _metric(rig.stacks[OURS].metrics_text(), HIT_METRIC) - _metric(hits, HIT_METRIC)
    if served < 0.99 * sum(s.wrk.requests for s in out[HIT]):
        raise c.BenchError(f"ours answered {served:.0f} hits for {out[HIT]} requests")
    return out


# -- report -----------------------------------------------------------------------------


def p50(samples: Sequence[Sample]) -> float:
    return c.median([s.wrk.p50_ms for s in samples])


def p99(samples: Sequence[Sample]) -> float:
    return c.median([s.wrk.p99_ms for s in samples])


def rps(samples: Sequence[Sample]) -> float:
    return sum(s.wrk.requests for s in samples) / sum(s.wrk.seconds for s in samples)


def cpu_us(samples: Sequence[Sample], names: Sequence[str] | None = None) -> float:
    """CPU µs per request of the path's processes (`names`, default all of them)."""
    requests = sum(s.wrk.requests for s in samples)
    seconds = sum(v for s in samples for k, v in s.cpu.items() if names is None or k in names)
    return seconds / requests * 1e6 if requests else float("nan")


def _own(path: str) -> tuple[str, ...]:
    """The processes counted as the gateway's own CPU (not its database or store)."""
    return ("gateway",) if path == OFFICIAL else ("Envoy", "ext_proc")


def latency_table(data: dict[str, list[Sample]]) -> str:
    direct, bare = p50(data[DIRECT]), p50(data[BARE])
    rows = []
    for path, samples in data.items():
        value = p50(samples)
        rows.append(
            [
                path,
                f"{value:.3f}",
                _spread(samples),
                f"{p99(samples):.3f}",
                f"{value - direct:+.3f}",
                f"{value - bare:+.3f}",
                f"{rps(samples):,.0f}",
                f"{cpu_us(samples, _own(path)):,.0f}",
            ]
        )
    header = ["path", "p50 ms", "rounds' p50", "p99 ms", "added p50 vs direct", "vs bare Envoy"]
    header.append("req/s")
    return c.table([*header, "own CPU µs/req"], rows)


def _spread(samples: Sequence[Sample]) -> str:
    """The lowest and highest p50 of the rounds: how much the machine's noise moved it."""
    values = [s.wrk.p50_ms for s in samples]
    return f"{min(values):.3f} to {max(values):.3f}"


def throughput_table(data: dict[str, list[Sample]]) -> str:
    official = rps(data[OFFICIAL])
    rows = [
        [
            path,
            f"{rps(s):,.0f}",
            _rps_spread(s),
            f"{rps(s) / official:.2f}",
            f"{p50(s):.3f}",
            f"{p99(s):.3f}",
        ]
        for path, s in data.items()
    ]
    return c.table(["path", "req/s", "rounds' req/s", "/ official", "p50 ms", "p99 ms"], rows)


def _rps_spread(samples: Sequence[Sample]) -> str:
    values = [s.wrk.rps for s in samples]
    return f"{min(values):,.0f} to {max(values):,.0f}"


def cpu_table(data: dict[str, list[Sample]], connections: int) -> str:
    names = ("Envoy", "ext_proc", "gateway", "redis-server", "Postgres")
    rows = []
    for path, samples in data.items():
        if path == DIRECT:
            continue
        row = [path] + [
            f"{cpu_us(samples, (n,)):,.0f}" if n in samples[0].cpu else "-" for n in names
        ]
        rows.append([*row, f"{cpu_us(samples, _own(path)):,.0f}", f"{cpu_us(samples):,.0f}"])
    note = (
        f"CPU µs per request at {connections} connection(s), from /proc (each process with "
        "its descendants; nginx and wrk excluded). *own* is Envoy + ext_proc for ours, the "
        "gateway process for the official one; *all* adds the store or database.\n\n"
    )
    return note + c.table(["path", *names, "own", "all"], rows)


def ttft_table(ttft: Ttft) -> str:
    data = ttft.samples
    direct, bare = c.percentile(data[DIRECT], 50), c.percentile(data[BARE], 50)
    rows = []
    for path, samples in data.items():
        value = c.percentile(samples, 50)
        rows.append(
            [
                path,
                str(len(samples)),
                f"{ttft.whole[path]} / {ttft.failures[path]}",
                f"{value:.3f}",
                f"{c.percentile(samples, 99):.3f}",
                f"{value - direct:+.3f}",
                f"{value - bare:+.3f}",
            ]
        )
    header = ["path", "samples", "not streamed / failed", "TTFT p50 ms", "p99 ms"]
    note = (
        "\n\n*not streamed*: answers that came in one piece with a content-length (the "
        "official gateway does this when the upstream's stream has ended before it answers; "
        "their first token came with the last); *failed*: timed out (10 s), then reconnected."
    )
    return c.table([*header, "added vs direct", "vs bare Envoy"], rows) + note


def issue_table(run: Run) -> str:
    """The issue's own table: the official gateway and ours side by side."""
    columns = (OFFICIAL, OURS, REDIS, WORKERS)
    ttft = run.ttft.samples
    official_rps = rps(run.sixteen[OFFICIAL])

    def added(path: str) -> str:
        if path not in run.one:
            return "-"
        return f"{p50(run.one[path]) - p50(run.one[DIRECT]):+.2f} ms"

    def first(path: str) -> str:
        if path not in ttft:
            return "-"
        return f"{c.percentile(ttft[path], 50) - c.percentile(ttft[DIRECT], 50):+.2f} ms"

    def cpu(path: str) -> str:
        own, total = cpu_us(run.sixteen[path], _own(path)), cpu_us(run.sixteen[path])
        store = f" (+{(total - own) / 1000:.2f} Redis)" if total - own >= 0.0005 else ""
        return f"{own / 1000:.2f} ms{store}"

    rows = [
        ["added p50, 1 connection", *map(added, columns)],
        ["req/s, 16 connections (ratio)"]
        + [f"{rps(run.sixteen[path]) / official_rps:.2f}" for path in columns],
        ["added time to first token", *map(first, columns)],
        ["CPU per request (16 connections)", *map(cpu, columns)],
    ]
    postgres = cpu_us(run.sixteen[OFFICIAL], ("Postgres",))
    note = (
        f"\n\nAdded: over the upstream direct. The official gateway served "
        f"{official_rps:,.0f} req/s at 16 connections. CPU: Envoy + ext_proc for ours, the "
        f"`claude` process for the official gateway (its Postgres: {postgres:,.0f} µs per "
        "request more)."
    )
    return c.table(["", *columns], rows) + note


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _noise(a: Sequence[Sample], b: Sequence[Sample]) -> str:
    """A warning when two paths' per-round p50 ranges overlap: the difference is noise."""
    low_a, high_a = min(s.wrk.p50_ms for s in a), max(s.wrk.p50_ms for s in a)
    low_b, high_b = min(s.wrk.p50_ms for s in b), max(s.wrk.p50_ms for s in b)
    overlap = len(a) > 1 and len(b) > 1 and low_a <= high_b and low_b <= high_a
    return " (the rounds' p50 ranges overlap: within noise; see the CPU row)" if overlap else ""


def targets(run: Run) -> list[list[str]]:
    one, sixteen, ttft = run.one, run.sixteen, run.ttft.samples
    added = {path: p50(one[path]) - p50(one[DIRECT]) for path in one}
    first = {path: c.percentile(ttft[path], 50) - c.percentile(ttft[DIRECT], 50) for path in ttft}
    ratio = {path: rps(sixteen[path]) / rps(sixteen[OFFICIAL]) for path in sixteen}
    own_cpu = cpu_us(sixteen[OURS], _own(OURS))
    limits = p50(one[REDIS]) - p50(one[REDIS_OPEN])
    limits_cpu = cpu_us(sixteen[REDIS]) - cpu_us(sixteen[REDIS_OPEN])
    hit, passed = p50(run.hit[HIT]), p50(run.hit[OFFICIAL])
    large = p50(run.large[OURS]) - p50(run.large[BARE])
    large_official = p50(run.large[OFFICIAL]) - p50(run.large[DIRECT])
    rows = [
        ("added p50 at 1 connection ≤ the official gateway's (vs direct)",
         f"{added[OURS]:+.3f} ms", f"{added[OFFICIAL]:+.3f} ms", added[OURS] <= added[OFFICIAL]),
        ("req/s at 16 connections ≥ the official gateway's",
         f"{ratio[OURS]:.2f} of it", "1.00", ratio[OURS] >= 1),
        ("… and with `--workers 2` (Redis store)",
         f"{ratio[WORKERS]:.2f} of it", "1.00", ratio[WORKERS] >= 1),
        ("added time to first token ≤ the official gateway's (vs direct)",
         f"{first[OURS]:+.3f} ms", f"{first[OFFICIAL]:+.3f} ms", first[OURS] <= first[OFFICIAL]),
        (f"CPU per request (Envoy + ext_proc) ≤ {TARGET_CPU_US / 1000:g} ms (16 connections)",
         f"{own_cpu / 1000:.3f} ms", f"{cpu_us(sixteen[OFFICIAL], _own(OFFICIAL)) / 1000:.3f} ms",
         own_cpu <= TARGET_CPU_US),
        ("cache hit answered faster than the official gateway passes the request through",
         f"{hit:.3f} ms p50", f"{passed:.3f} ms p50", hit < passed),
        ("Redis store: added p50 ≤ the official gateway's (vs direct)",
         f"{added[REDIS]:+.3f} ms", f"{added[OFFICIAL]:+.3f} ms", added[REDIS] <= added[OFFICIAL]),
        (f"Redis store: budget + rate limit add ≤ {TARGET_LIMITS_MS} ms p50",
         f"{limits:+.3f} ms{_noise(one[REDIS], one[REDIS_OPEN])}", "-",
         limits <= TARGET_LIMITS_MS),
        ("… their CPU per request (Envoy + ext_proc + redis-server, 16 connections)",
         f"{limits_cpu / 1000:+.3f} ms", "-", limits_cpu <= TARGET_LIMITS_MS * 1000),
        (f"117 KB Claude Code request, guard on: added p50 ≤ {TARGET_LARGE_MS:g} ms "
         "(vs bare Envoy)", f"{large:+.3f} ms", f"{large_official:+.3f} ms (vs direct)",
         large <= TARGET_LARGE_MS),
    ]  # fmt: skip
    return [[name, ours, official, _verdict(ok)] for name, ours, official, ok in rows]


def _method(args: argparse.Namespace) -> str:
    warmup = f"after {args.warmup:g} s of warm-up" if args.warmup > 0 else "no warm-up"
    return (
        f"Load: wrk (closed loop, keep-alive; -t1 at 1 connection, -t2 at 16), {args.rounds} "
        f"rounds of {args.duration:g} s per path, the paths alternating within each round "
        f"({warmup} per path and connection count). Every request "
        "carries a token no other request of the run used (wrk's `request()` hook), so ours "
        "runs the cache's miss path (lookup, single-flight lock, store) each time; the "
        "cache-hit case repeats one primed request. Upstream: nginx (one process, "
        "keep-alive) answering a 2 KB Anthropic message, or (query `bench_sse=1`, which both "
        "gateways forward) an SSE stream whose first delta is written at once and the rest "
        f"{gb.SSE_REST_DELAY * 1000:g} ms later. TTFT: up to {args.ttft_samples} samples per "
        "path over one keep-alive connection each, paths alternating, from sending the "
        "request to the first `content_block_delta` byte. Ours: gateway key, model "
        "allow-list (team and route), guard on the request and the answer (`guard: {}`), "
        "response cache, budgets (key, team, pipeline) and rate limits (key, team), audit "
        "to a JSON-lines file, Prometheus metrics; the Redis variants use a bench-started "
        "redis-server (a database each). The official gateway: `claude gateway` via "
        "../shared/anchors/claude-gateway/start.sh (its Postgres holds logins and spend; no "
        "spend limits set), bearer token."
    )


def render(run: Run) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [
        "## Issue 17 anchor (generated by bench/anchor_bench.py)",
        f"Run {now}:\n\n```\n{run.command}\n```",
        c.machine_table(run.facts, run.load_before, run.load_after),
        _method(run.args),
        "### The issue's table\n\n" + issue_table(run),
        "### Targets\n\n"
        + c.table(["target", "ours", "official gateway", "verdict"], targets(run)),
        "### 2 KB POST /v1/messages, 1 connection\n\n" + latency_table(run.one),
        "### 2 KB POST /v1/messages, 16 connections\n\n" + throughput_table(run.sixteen),
        "### Time to first streamed token (1 connection)\n\n" + ttft_table(run.ttft),
        "### CPU per request\n\n" + cpu_table(run.sixteen, 16),
        cpu_table(run.one, 1),
        "### Cache hit vs the official gateway passing the same 2 KB request through\n\n"
        + latency_table({DIRECT: run.one[DIRECT], **run.hit}),
        "### 117 KB Claude Code request (recorded shape), guard on, 1 connection\n\n"
        + latency_table(run.large),
        "### What the policies did\n\n" + "\n".join(run.checks),
    ]
    for name, summary in run.profiles.items():
        case = next(case for case in PROFILES if case.name == name)
        parts.append(
            f"### py-spy profile of ours' ext_proc ({name})\n\n{summary}\n\nThe folded "
            f"stacks are kept in `{profile_path(case)}` (flamegraph.pl or speedscope draw them)."
        )
    return "\n\n".join(parts)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 min smoke run; prints only")
    parser.add_argument("--duration", type=float, help="measured seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per case (3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per path (1; 0 skips)")
    parser.add_argument("--ttft-samples", type=int, help="TTFT samples per path (1000)")
    parser.add_argument("--profile", action="store_true", help="also py-spy ours' ext_proc")
    parser.add_argument("--output", type=Path, help=f"report file (default {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument(
        "--install-deps", action="store_true", help="apt/pip-install wrk, nginx, redis, py-spy"
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.0 if args.quick else 1.0)
    args.ttft_samples = args.ttft_samples or (100 if args.quick else 1000)
    args.ttft_budget = 3.0 if args.quick else 15.0
    args.write = not args.no_write and (args.output is not None or not args.quick)
    args.output = args.output or RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> Run:
        tools = ["wrk", "nginx", "redis-server", *(["py-spy"] if args.profile else [])]
        found = c.require_tools(tools, args.install_deps)
        with tempfile.TemporaryDirectory(prefix="anchor-bench-") as workdir:
            return measure(args, found, Path(workdir))

    output = args.output if args.write else None
    return c.run_and_report("anchor_bench", TIME_LIMIT, work, render, output, SECTION)


if __name__ == "__main__":
    raise SystemExit(main())
