"""Issue 17 probe: does FULL_DUPLEX_STREAMED on the request body save a blocking round trip?

Today's ext_proc config (envoy/front-proxy.yaml) sends the request headers, waits for the
reply, then sends the BUFFERED body and waits again: two blocking round trips before the
request goes upstream. With `request_body_mode: FULL_DUPLEX_STREAMED` Envoy sends the
headers and the body chunks without waiting; the server holds its header reply until the
body is complete, then answers the headers (routing mutation + clear_route_cache) and the
body (`streamed_response`, the whole new body, end_of_stream): one wait.

Paths, all from the gateway's own bootstrap (tests/harness.py Stack) in front of one upstream
Envoy whose Lua filter checks what arrives (the rewritten model in the body, the mutated
header, body length = content-length when one is sent) and answers 2 KB of JSON:

- *bare Envoy*: the bootstrap without ext_proc (the reference for "added");
- *A: buffered*: today's modes (headers SEND, body BUFFERED; response headers SEND, body NONE
  switched to BUFFERED by mode_override) against a minimal ext_proc server on the project's
  native gRPC transport that mutates headers + rewrites the body in its body reply;
- *B: duplex*: request body FULL_DUPLEX_STREAMED (+ request trailers SEND, which Envoy
  requires), same response side, the server answering headers + body at end of body.

Both servers do the same work: a header mutation (x-gateway-cluster + clear_route_cache, the
gateway's routing) and a body rewrite (the model name). Routes other than "dispatch" answer
421 here, so a request the server did not route never reaches the upstream.

Measured with wrk at 1 connection, paths alternating round by round (the machine is shared):
p50 and CPU per request of each path's Envoy + ext_proc (from /proc). Then checks of what
Envoy 1.40 does in duplex mode: what the upstream received, whether the response-side
mode_override is honoured, an ImmediateResponse mid-body, a body over the buffer limit, a
hung server (message_timeout), and config validation (trailer mode, failure_mode_allow).

    python bench/duplex_probe.py                 # 3 rounds x 2 s per path and body (~1 min)
    python bench/duplex_probe.py --rounds 1 --seconds 1 --no-checks
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import gateway_bench as gb
import orjson
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import supervisor
from tests.data.claude_code_request import build_request
from tests.harness import Stack, gateway_config

BARE, BUFFERED = "bare Envoy", "A: buffered (today)"
DUPLEX = "B: duplex request (per-route mode)"
FILTER_DUPLEX = "B0: duplex request (filter-level mode)"
PATHS = (BARE, BUFFERED, DUPLEX, FILTER_DUPLEX)
EXT_PROC_PATHS = PATHS[1:]
# How each ext_proc path's Envoy sets FULL_DUPLEX_STREAMED on the request body: not at all,
# per route (ExtProcPerRoute; the filter-level mode stays today's, so the response-side
# mode_override is still honoured), or in the filter config itself.
WHERE = {BUFFERED: "", DUPLEX: "route", FILTER_DUPLEX: "filter"}
PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
NEW_MODEL = b"probe-rewritten-model"
CLUSTER = "provider_anthropic"
BUFFER_LIMIT = 1024 * 1024  # both probe Envoys' per_connection_buffer_limit_bytes
MESSAGE_TIMEOUT = "1s"  # short, so the hung-server check ends quickly
Mode = processing_mode_pb2.ProcessingMode


# -- bodies -----------------------------------------------------------------------------


def small_body() -> bytes:
    return gb.request_body(False)


def large_body() -> bytes:
    document = build_request()
    document["stream"] = False
    return orjson.dumps(document)


def rewrite(body: bytes) -> bytes:
    """The body with its first `"model":"..."` value replaced (a different length, so a
    stale content-length would show)."""
    key = b'"model":"'
    start = body.find(key)
    if start < 0:
        return body
    start += len(key)
    end = body.index(b'"', start)
    return body[:start] + NEW_MODEL + body[end:]


# -- the ext_proc server: the same work in both modes -----------------------------------


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    option = base_pb2.HeaderValueOption()
    option.header.key = key
    option.header.raw_value = value.encode()
    return option


def _routing(common: Any, new_length: int | None) -> None:
    """The gateway's routing mutation: the cluster header, re-route, a marker, the length."""
    mutation = common.header_mutation
    mutation.set_headers.append(_header("x-gateway-cluster", CLUSTER))
    mutation.set_headers.append(_header("x-probe-mutated", "1"))
    if new_length is not None:
        mutation.set_headers.append(_header("content-length", str(new_length)))
    common.clear_route_cache = True


COUNTS: Counter[str] = Counter()


class Probe:
    """One ext_proc server; `duplex` picks how the request side is answered."""

    def __init__(self, duplex: bool) -> None:
        self.duplex = duplex

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        stream = _Stream(self.duplex)
        async for request in requests:
            phase = request.WhichOneof("request")
            COUNTS[phase] += 1
            stream.seen.append(phase)
            for reply in stream.on(phase, request):
                yield reply


@dataclass
class _Stream:
    duplex: bool
    seen: list[str] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    headers_answered: bool = False
    hang: bool = False
    reject: bool = False
    die: bool = False
    keep: bool = False  # pass the body through unchanged
    late: bool = False  # duplex: a header mutation in the body reply, not the header reply
    plain: bool = False  # duplex: the new body as body_mutation.body, not streamed_response

    def on(self, phase: str, request: Any) -> list[Any]:
        if self.hang:
            return []
        if phase == "request_headers":
            return self._request_headers(request.request_headers)
        if phase == "request_body":
            return self._request_body(request.request_body)
        if phase == "request_trailers":
            return self._request_trailers()
        if phase == "response_headers":
            return [self._response_headers()]
        return [_empty(phase)]

    def _request_headers(self, headers: Any) -> list[Any]:
        names = {h.key for h in headers.headers.headers}
        self.hang, self.reject = "x-probe-hang" in names, "x-probe-reject" in names
        self.die, self.keep = "x-probe-die" in names, "x-probe-keep" in names
        self.late, self.plain = "x-probe-late" in names, "x-probe-plain" in names
        if self.hang:
            return []
        if headers.end_of_stream or not self.duplex:
            self.headers_answered = headers.end_of_stream
            return [_empty("request_headers")] if not headers.end_of_stream else [self._route(b"")]
        return []  # duplex: hold the header reply until the body is complete

    def _request_body(self, body: Any) -> list[Any]:
        if self.reject:
            return [_reject()]
        if self.die:  # the call ends with an error status once the body has started
            raise RuntimeError("probe: the server fails mid-request")
        self.chunks.append(body.body)
        if not body.end_of_stream:
            return []
        whole = b"".join(self.chunks)
        new = whole if self.keep else rewrite(whole)
        self.chunks = []
        if not self.duplex:  # BUFFERED: routing + new body in the body reply (today's gateway)
            response = pb.ProcessingResponse()
            common = response.request_body.response
            _routing(common, None if self.keep else len(new))
            if not self.keep:  # an unchanged body needs no mutation in BUFFERED mode...
                common.body_mutation.body = new
            return [response]
        if self.late or self.plain:
            return [self._route(new), self._variant(new)]
        return [self._route(new), _streamed(new)]  # ...but must be sent back in duplex mode

    def _variant(self, new: bytes) -> Any:
        """A body reply Envoy may not accept in duplex mode (the `late`/`plain` checks)."""
        response = _streamed(new) if self.late else pb.ProcessingResponse()
        common = response.request_body.response
        if self.late:
            header = _header("x-probe-late-set", "1")
            common.header_mutation.set_headers.append(header)
        else:
            common.body_mutation.body = new
        return response

    def _request_trailers(self) -> list[Any]:
        replies = []
        if self.duplex and not self.headers_answered:  # body ended without end_of_stream
            new = rewrite(b"".join(self.chunks))
            replies += [self._route(new), _streamed(new)]
        return [*replies, _empty("request_trailers")]

    def _route(self, new: bytes) -> Any:
        """The header reply in duplex mode: routing, sent once the whole body is here."""
        self.headers_answered = True
        response = pb.ProcessingResponse()
        _routing(response.request_headers.response, len(new))
        return response

    def _response_headers(self) -> Any:
        response = pb.ProcessingResponse()
        mutation = response.response_headers.response.header_mutation
        mutation.set_headers.append(_header("x-probe-seq", ",".join(self.seen)))
        mutation.set_headers.append(_header("x-probe-counts", json.dumps(dict(COUNTS))))
        response.mode_override.response_body_mode = Mode.BUFFERED
        return response


def _empty(phase: str) -> Any:
    response = pb.ProcessingResponse()
    getattr(response, phase).SetInParent()
    return response


def _streamed(new: bytes) -> Any:
    response = pb.ProcessingResponse()
    streamed = response.request_body.response.body_mutation.streamed_response
    streamed.body = new
    streamed.end_of_stream = True
    return response


def _reject() -> Any:
    response = pb.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = 413
    immediate.body = b'{"type":"error","error":{"type":"request_too_large","message":"probe"}}'
    immediate.details = "extproc_probe_reject"
    return response


# -- the upstream: an Envoy whose Lua filter checks what arrived ------------------------

_UPSTREAM_LUA = """
function envoy_on_request(handle)
  local body = handle:body()  -- first: a headers object taken before it goes stale
  local h = handle:headers()
  local n = 0
  local text = ""
  if body ~= nil then
    n = body:length()
    text = body:getBytes(0, n)
  end
  local cl = h:get("content-length") or "none"
  local te = h:get("transfer-encoding") or "none"
  local out = {[":status"] = "200", ["content-type"] = "application/json",
               ["x-probe-len"] = tostring(n), ["x-probe-cl"] = cl, ["x-probe-te"] = te,
               ["x-probe-late-seen"] = h:get("x-probe-late-set") or "no"}
  if h:get("x-probe-mutated") == "1" and h:get("x-probe-keep") ~= nil then
    if n == 0 or string.find(text, '"model":"%s"', 1, true) ~= nil then
      out[":status"] = "400"
      handle:respond(out, "body lost or rewritten")
      return
    end
  elseif h:get("x-probe-mutated") == "1" then
    if string.find(text, '"model":"%s"', 1, true) == nil then
      out[":status"] = "400"
      handle:respond(out, "body not rewritten")
      return
    end
    if cl ~= "none" and tonumber(cl) ~= n then
      out[":status"] = "400"
      handle:respond(out, "content-length mismatch")
      return
    end
  end
  handle:respond(out, [==[%s]==])
end
"""


def upstream_bootstrap(port: int) -> dict[str, Any]:
    model = NEW_MODEL.decode()
    source = _UPSTREAM_LUA % (model, model, gb.response_body().decode())
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network"
            ".http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "upstream",
            "route_config": {"virtual_hosts": [{"name": "u", "domains": ["*"], "routes": []}]},
            "http_filters": [
                {
                    "name": "envoy.filters.http.lua",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                        "default_source_code": {"inline_string": source},
                    },
                },
                {"name": "envoy.filters.http.router", "typed_config": {"@type": router}},
            ],
        },
    }
    listener: dict[str, Any] = {
        "name": "upstream",
        "address": c.address(port),
        "filter_chains": [{"filters": [hcm]}],
    }
    listener["per_connection_buffer_limit_bytes"] = 8 * BUFFER_LIMIT  # sees what gets through
    return {
        "admin": {"address": c.address(c.free_port())},
        "static_resources": {"listeners": [listener], "clusters": []},
    }


# -- the front proxies ------------------------------------------------------------------


def _ext_proc(bootstrap: dict[str, Any]) -> dict[str, Any]:
    filters = c.hcm_of(bootstrap)["http_filters"]
    found: dict[str, Any] = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    return found["typed_config"]  # type: ignore[no-any-return]


def _duplex(mode: dict[str, Any]) -> dict[str, Any]:
    return {**mode, "request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND"}


def front_bootstrap(gateway: dict[str, Any], grpc_port: int, where: str) -> dict[str, Any]:
    """The gateway bootstrap on a new port, ext_proc at `grpc_port`, unrouted requests 421;
    `where`: "" (today's modes), "route" or "filter" (where the request body goes duplex)."""
    front = gb.null_bootstrap(gateway, c.free_port(), grpc_port)
    listener = front["static_resources"]["listeners"][0]
    listener["per_connection_buffer_limit_bytes"] = BUFFER_LIMIT
    ext_proc = _ext_proc(front)
    ext_proc["message_timeout"] = MESSAGE_TIMEOUT
    today = dict(ext_proc["processing_mode"])
    if where == "filter":
        ext_proc["processing_mode"] = _duplex(today)
    override = {"@type": PER_ROUTE, "overrides": {"processing_mode": _duplex(today)}}
    vhost = c.hcm_of(front)["route_config"]["virtual_hosts"][0]
    for route in vhost["routes"]:
        if route.get("name") == "dispatch":
            continue
        route.pop("route", None)
        route["direct_response"] = {"status": 421, "body": {"inline_string": "not routed"}}
        if where == "route":  # the policy routes: the ones matched when ext_proc starts
            route["typed_per_filter_config"] = {"envoy.filters.http.ext_proc": override}
    return front


def url_of(bootstrap: dict[str, Any]) -> str:
    port = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    return f"http://127.0.0.1:{port['port_value']}"


@dataclass
class Rig:
    workdir: Path
    envoys: dict[str, c.EnvoyProcess] = field(default_factory=dict)
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)

    def pids(self, path: str) -> dict[str, int]:
        out = {"envoy": self.envoys[path].pid}
        if path in self.servers:
            out["ext_proc"] = self.servers[path].pid
        return out

    def close(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        c.stop_all(list(self.servers.values()))


def start_server(mode: str, name: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = c.free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", mode, str(port)]
    log_path = workdir / f"server-{name}.log"
    with log_path.open("ab") as log:
        process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
    if not c.wait_port(port, process, 30):
        c.stop_all([process])
        raise c.BenchError(f"ext_proc {mode} did not start:\n{log_path.read_text()}")
    return process, port


def start_rig(rig: Rig) -> None:
    up_port = c.free_port()
    rig.envoys["upstream"] = c.EnvoyProcess("upstream", upstream_bootstrap(up_port), rig.workdir)
    rig.envoys["upstream"].start()
    config = gateway_config(f"http://127.0.0.1:{up_port}")
    config["providers"]["anthropic"]["credential"] = {"value": "sk-ant-probe"}
    rig.gateway = Stack(config, rig.workdir).bootstrap()
    bare = gb.bare_bootstrap(rig.gateway, c.free_port())
    rig.envoys[BARE] = c.EnvoyProcess("bare", bare, rig.workdir).start()
    rig.urls[BARE] = url_of(bare)
    for path, where in WHERE.items():
        name = where or "buffered"
        rig.servers[path], grpc_port = start_server(
            "duplex" if where else "buffered", name, rig.workdir
        )
        front = front_bootstrap(rig.gateway, grpc_port, where)
        rig.envoys[path] = c.EnvoyProcess(name, front, rig.workdir).start()
        rig.urls[path] = url_of(front)


@contextlib.contextmanager
def running_rig() -> Iterator[Rig]:
    rig = Rig(Path(tempfile.mkdtemp(prefix="duplex-probe-")))
    try:
        start_rig(rig)
        yield rig
    finally:
        rig.close()


# -- one request, for the checks --------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def post(url: str, body: bytes, extra: dict[str, str] | None = None, timeout: float = 5) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"content-type": "application/json", **(extra or {})}
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/messages", body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        got = {k.lower(): v for k, v in answer.getheaders()}
        return Reply(answer.status, got, data, time.monotonic() - started)
    except TimeoutError:
        return Reply(0, {}, b"client timeout", time.monotonic() - started)
    finally:
        conn.close()


# -- measurement ------------------------------------------------------------------------


@dataclass
class Sample:
    p50_ms: float
    requests: int
    envoy_us: float  # CPU per request of the path's Envoy
    ext_proc_us: float  # and of its ext_proc server

    @property
    def cpu_us(self) -> float:
        return self.envoy_us + self.ext_proc_us


def measure(
    rig: Rig, wrk: str, body: bytes, rounds: int, seconds: float, keep: bool
) -> dict[str, list[Sample]]:
    headers = {"content-type": "application/json"} | ({"x-probe-keep": "1"} if keep else {})
    scripts = {}
    for path in PATHS:
        script = rig.workdir / f"wrk-{len(body)}.lua"
        script.write_text(c.wrk_script("POST", body, headers))
        scripts[path] = script
    out: dict[str, list[Sample]] = {path: [] for path in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            command = c.wrk_command(
                wrk, rig.urls[path] + "/v1/messages", scripts[path], 1, 1, seconds
            )
            meter = c.CpuMeter(rig.pids(path))
            meter.begin()
            result = c.run_wrk(command, seconds)
            cpu = meter.end().seconds
            per = 1e6 / result.requests
            envoy, ext_proc = cpu["envoy"] * per, cpu.get("ext_proc", 0.0) * per
            out[path].append(Sample(result.p50_ms, result.requests, envoy, ext_proc))
    return out


# -- checks of Envoy 1.40's duplex behaviour --------------------------------------------


def check_paths(rig: Rig, bodies: dict[str, bytes], keep: bool) -> list[str]:
    """Each path answers 200 and its upstream saw the rewritten (or kept) body, whole."""
    lines = []
    extra = {"x-probe-keep": "1"} if keep else {}
    for name, body in bodies.items():
        want = len(body if keep else rewrite(body))
        for path in EXT_PROC_PATHS:
            reply = post(rig.urls[path], body, extra)
            h = reply.headers
            ok = reply.status == 200 and h.get("x-probe-len") == str(want)
            lines.append(
                f"- {path}, {name}: status {reply.status}, upstream got {h.get('x-probe-len')} "
                f"bytes (rewritten: {want}), content-length {h.get('x-probe-cl')}, "
                f"transfer-encoding {h.get('x-probe-te')}; ext_proc saw "
                f"`{h.get('x-probe-seq')}` before the response headers"
                + ("" if ok else f" **FAILED: {reply.body[:200]!r}**")
            )
            if not ok:
                raise c.BenchError("\n".join(lines))
    return lines


def check_override(rig: Rig, body: bytes) -> list[str]:
    """Whether the response-side mode_override (NONE -> BUFFERED) is honoured: the server's
    response_body count must grow by one per request."""
    lines = []
    for path in EXT_PROC_PATHS:
        before = _counts(post(rig.urls[path], body))
        after = _counts(post(rig.urls[path], body))
        grew = after.get("response_body", 0) - before.get("response_body", 0)
        lines.append(f"- {path}: response_body messages per request = {grew}")
    return lines


def _counts(reply: Reply) -> dict[str, int]:
    counts: dict[str, int] = json.loads(reply.headers.get("x-probe-counts", "{}"))
    return counts


def check_body_replies(rig: Rig, body: bytes) -> list[str]:
    """Duplex: a header mutation in the body reply; a plain body_mutation.body reply."""
    late = post(rig.urls[DUPLEX], body, {"x-probe-late": "1"})
    plain = post(rig.urls[DUPLEX], body, {"x-probe-plain": "1"})
    return [
        f"- header mutation sent in the body reply: status {late.status}, upstream saw it: "
        f"{late.headers.get('x-probe-late-seen', '-')}",
        f"- body_mutation.body instead of streamed_response: status {plain.status} "
        f"({plain.body[:80]!r})",
    ]


def check_edges(rig: Rig, body: bytes) -> list[str]:
    big = body + b" " * (BUFFER_LIMIT + 512 * 1024 - len(body))  # JSON with trailing spaces
    lines = []
    for path in EXT_PROC_PATHS:
        reject = post(rig.urls[path], body, {"x-probe-reject": "1"})
        hang = post(rig.urls[path], body, {"x-probe-hang": "1"}, timeout=4)
        over = post(rig.urls[path], big)
        lines.append(
            f"- {path}: ImmediateResponse on the body -> {reject.status} "
            f"({reject.headers.get('x-gateway-error', '')}{reject.body[:40]!r}); "
            f"server never answers -> {hang.status or 'no answer'} after {hang.seconds:.1f} s "
            f"(message_timeout {MESSAGE_TIMEOUT}); body of {len(big):,} bytes over the "
            f"{BUFFER_LIMIT:,}-byte buffer limit -> {over.status} "
            f"(upstream got {over.headers.get('x-probe-len', '-')} bytes)"
        )
    return lines


def check_fail_open(rig: Rig, body: bytes) -> list[str]:
    """With failure_mode_allow: true, a server failing once the body has started: fail open
    gives this probe's 421 (Envoy went on without ext_proc to the policy route), fail closed
    the gateway's 503 (status_on_error)."""
    lines = []
    for path in (BUFFERED, DUPLEX):
        grpc_port = _grpc_port(rig.envoys[path].bootstrap)
        front = front_bootstrap(rig.gateway, grpc_port, WHERE[path])
        _ext_proc(front)["failure_mode_allow"] = True
        envoy = c.EnvoyProcess(f"open-{WHERE[path] or 'buffered'}", front, rig.workdir).start()
        try:
            reply = post(url_of(front), body, {"x-probe-die": "1"})
        finally:
            envoy.stop()
        verdict = {421: "failed open", 503: "failed closed"}.get(reply.status, "?")
        lines.append(f"- {path}: {reply.status} ({verdict})")
    return lines


def _grpc_port(bootstrap: Mapping[str, Any]) -> int:
    clusters = bootstrap["static_resources"]["clusters"]
    cluster = next(k for k in clusters if k["name"] == "extproc")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    port: int = endpoint["address"]["socket_address"]["port_value"]
    return port


def check_config(rig: Rig) -> list[str]:
    """What `envoy --mode validate` says about duplex variants of the gateway bootstrap."""
    variants: dict[str, dict[str, Any]] = {
        "duplex request body, request_trailer_mode SKIP": {"request_trailer_mode": "SKIP"},
        "duplex request body, trailers SEND, failure_mode_allow true": {"failure_mode_allow": True},
    }
    lines = []
    for name, change in variants.items():
        bootstrap = front_bootstrap(rig.gateway, c.free_port(), "filter")
        ext_proc = _ext_proc(bootstrap)
        if "failure_mode_allow" in change:
            ext_proc["failure_mode_allow"] = True
        else:
            ext_proc["processing_mode"].update(change)
        lines.append(f"- {name}: {_validate(rig.workdir, bootstrap)}")
    return lines


def _validate(workdir: Path, bootstrap: dict[str, Any]) -> str:
    path = workdir / "validate.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(bootstrap)), encoding="utf-8")
    command = [supervisor.envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "critical"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    text = (result.stdout + result.stderr).strip().splitlines()
    detail = next((ln for ln in text if "FULL_DUPLEX" in ln or "failure_mode" in ln), "")
    verdict = "accepted" if result.returncode == 0 else "rejected"
    return verdict + (f": `{detail.strip()[-220:]}`" if detail and result.returncode else "")


# -- report -----------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> str:
    return f"{c.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"


_CPU = ("cpu_us", "envoy_us", "ext_proc_us")


def render(data: dict[str, dict[str, list[Sample]]], rounds: int, seconds: float) -> str:
    rows = []
    for name, runs in data.items():
        bare = c.median([s.p50_ms for s in runs[BARE]])
        for path in PATHS:
            samples = runs[path]
            added = "-" if path == BARE else _stats([s.p50_ms - bare for s in samples])
            cpu = [_stats([getattr(s, k) for s in samples]) for k in _CPU]
            p50 = _stats([s.p50_ms for s in samples])
            rows.append([name, path, p50, added, *cpu, _paired(samples, runs[BUFFERED])])
    head = ["body", "path", "p50 ms", "added p50 ms vs bare", "CPU µs/request"]
    head += ["of it Envoy", "of it ext_proc", "vs A, same round: Δp50 ms / ΔCPU µs"]
    note = (
        f"Median (min-max) over {rounds} alternating rounds of {seconds:g} s per path (wrk, 1 "
        f"connection); CPU per request of the path's Envoy + ext_proc from /proc. Load "
        f"{c.load_average()} after the run."
    )
    return c.table(head, rows) + "\n\n" + note


def _paired(samples: Sequence[Sample], a: Sequence[Sample]) -> str:
    """Median (min-max) of the per-round differences to path A (same round, same load)."""
    if samples is a or not samples[0].ext_proc_us:
        return "-"
    dp = [s.p50_ms - r.p50_ms for s, r in zip(samples, a, strict=True)]
    dc = [s.cpu_us - r.cpu_us for s, r in zip(samples, a, strict=True)]
    return f"{_stats(dp)} / {c.median(dc):+.0f} ({min(dc):+.0f}..{max(dc):+.0f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-checks", action="store_true")
    keep = "the server passes the body through unchanged (duplex must still send it back)"
    parser.add_argument("--keep-body", action="store_true", help=keep)
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        c.serve_ext_proc(int(args.serve[1]), Probe(args.serve[0] == "duplex"))
        return 0

    def work() -> str:
        tools = c.require_tools(["wrk"], install=False)
        bodies = {"2 KB": small_body(), "117 KB": large_body()}
        with running_rig() as rig:
            report = ["### what the upstream received", *check_paths(rig, bodies, args.keep_body)]
            if not args.no_checks:
                report += [
                    "",
                    "### response-side mode_override",
                    *check_override(rig, bodies["2 KB"]),
                ]
                report += ["", "### edges", *check_edges(rig, bodies["2 KB"])]
                report += ["", "### duplex body replies", *check_body_replies(rig, bodies["2 KB"])]
                report += ["", "### server fails mid-body, failure_mode_allow: true"]
                report += check_fail_open(rig, bodies["2 KB"])
                report += ["", "### config validation", *check_config(rig)]
            data = {
                name: measure(rig, tools["wrk"], body, args.rounds, args.seconds, args.keep_body)
                for name, body in bodies.items()
            }
            report += ["", "### latency and CPU", render(data, args.rounds, args.seconds)]
            return "\n".join(report)

    run = c.guarded("duplex_probe", 240, work)
    if isinstance(run, int):
        return run
    print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
