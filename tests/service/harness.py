"""Envoy's part, played in-process: the service-layer harness (no sockets, no Envoy).

`ServiceStack` runs the gateway's gRPC servicer (`extproc.server.ExternalProcessor`) and
talks to it only through Envoy's ext_proc protobufs, the stable boundary. `drive()` plays
one HTTP request the way the front-proxy Envoy does (envoy/front-proxy.yaml):

1. the client's headers, with what Envoy adds (`x-request-id`, `x-forwarded-for` with the
   client's address appended, pseudo-headers) and `x-gateway-cluster` removed, go out as
   `request_headers` with the route's name and `extproc` metadata as attributes;
2. a body goes out whole (`request_body_mode: BUFFERED`), end_of_stream set;
3. unless the gateway answered (`ImmediateResponse`: the client gets it, the RPC is over),
   the header and body mutations are applied, the route is chosen (`x-gateway-cluster`),
   the Lua filter's gateway-key stripping is applied, and the fake provider *handler*
   answers (`FakeUpstream`: tests/fake_provider.py's answer logic, JSON and SSE);
4. `response_headers` go out; the body follows only in the mode the gateway asked for
   (`mode_override`; NONE by default): BUFFERED as one message, STREAMED chunk by chunk
   with an empty end_of_stream message last, as Envoy sends a chunked upstream body;
5. replies to every message are awaited in order within Envoy's `message_timeout`, which
   an `override_message_timeout` extends (up to `max_message_timeout`); a timeout or a
   failed RPC becomes the 503 `gateway_unavailable` local reply (failure_mode_allow off)
   or passes the request on unprocessed (on).

How a stream ends early follows what the pinned Envoy does with the shipped
`ext_proc_graceful_grpc_close` (see `extproc.stream._cut_short_outcome`): whether the
client went away (`client_abort_after`) or the provider's connection reset
(`x-fake-abort-after`), Envoy half-closes the RPC (the request iterator finishes).

Time: the gateway runs on `ServiceStack.clock` (a `ManualClock`), so rate windows, budget
windows, reservations, cache TTLs and key caches move only when a test advances it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2, text_format

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.store import ManualClock, Store
from extproc.telemetry.metrics import Metrics
from tests import fake_provider as fp

FAKE_URL = "http://fake-provider.test"
CLIENT_ADDRESS = "127.0.0.1"
_OPENAI_PATHS = re.compile(r"^/(v1/)?(chat/completions|completions|embeddings|responses)([/?].*)?$")
_MODE = processing_mode_pb2.ProcessingMode
_ids = itertools.count(1)


# ---- protobuf builders (what Envoy sends) -----------------------------------------------------


class ListSink:
    """An audit sink that keeps the records."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        return None


def headers(pairs: Mapping[str, str], eos: bool = False) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=eos)


def route_metadata(policy: Mapping[str, Any]) -> str:
    """The route's metadata as Envoy sends `xds.route_metadata`: protobuf text."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["extproc"].update(dict(policy))
    return text_format.MessageToString(metadata, as_one_line=True)


def request_headers(
    path: str,
    method: str = "POST",
    eos: bool = False,
    extra: Mapping[str, str] | None = None,
    *,
    route: str = "agent",
    policy: Mapping[str, Any] | None = None,
) -> pb.ProcessingRequest:
    pairs = {":method": method, ":path": path, "x-request-id": "req-1", "anthropic-version": "x"}
    pairs.update(extra or {})
    attributes = struct_pb2.Struct()
    values: dict[str, Any] = {"xds.route_name": route}
    if policy is not None:
        values["xds.route_metadata"] = route_metadata(policy)
    attributes.update(values)
    return pb.ProcessingRequest(
        request_headers=headers(pairs, eos),
        attributes={"envoy.filters.http.ext_proc": attributes},
    )


def request_body(body: bytes, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=eos))


def response_headers(
    status: int, content_type: str, extra: Mapping[str, str] | None = None, eos: bool = False
) -> pb.ProcessingRequest:
    pairs = {":status": str(status), "content-type": content_type, **(extra or {})}
    attributes = struct_pb2.Struct()
    attributes.update({"response.code_details": "via_upstream"})
    return pb.ProcessingRequest(
        response_headers=headers(pairs, eos),
        attributes={"envoy.filters.http.ext_proc": attributes},
    )


def response_body(chunk: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=eos))


def set_headers(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


async def until(condition: Callable[[], bool], seconds: float = 5.0, what: str = "") -> None:
    """Poll `condition` (bounded) instead of sleeping a fixed time and hoping."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what or condition}")
        await asyncio.sleep(0.005)


# ---- the fake provider as a handler ------------------------------------------------------------


@dataclass
class Answer:
    """What the provider sent: status, headers, body pieces, and whether it reset after."""

    status: int
    headers: dict[str, str]
    chunks: list[bytes]
    reset: bool = False
    request: fp.ReceivedRequest | None = None  # as the provider received it


class _Pieces:
    """A `fake_provider.ByteSink` that keeps what is written, one piece per write."""

    def __init__(self, coding: str | None) -> None:
        self.chunks: list[bytes] = []
        self.compressor = fp.Compressor(coding) if coding else None

    async def write(self, data: bytes) -> None:
        self.chunks.append(self.compressor.piece(data) if self.compressor else data)


class FakeUpstream:
    """tests/fake_provider.py's answers (same `handle`, same x-fake-* controls), called in
    process in place of the provider cluster. `hold()` makes the next calls wait until
    `release()`, so a test can line up concurrent requests without racing the clock."""

    def __init__(self, models: tuple[str, ...] = fp.DEFAULT_MODELS, text: str = "") -> None:
        self.models, self.text = models, text or fp.DEFAULT_TEXT
        self.received: list[fp.ReceivedRequest] = []
        self.in_flight = 0
        self._gate: asyncio.Event | None = None

    def clear(self) -> None:
        self.received.clear()

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    async def __call__(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> Answer:
        path, _, query = target.partition("?")
        received = fp.ReceivedRequest(method, path, query, dict(headers), body)
        self.received.append(received)
        self.in_flight += 1
        try:
            if self._gate is not None:
                await self._gate.wait()
            answer = await self._answer(method, path, dict(parse_qsl(query)), headers, body)
            answer.request = received
            return answer
        finally:
            self.in_flight -= 1

    async def _answer(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Answer:
        shape = fp.shape_of(path, headers)
        ids = {"request-id": "req_fake"} if shape == "anthropic" else {"x-request-id": "req_fake"}
        try:
            controls = fp.parse_controls(headers, self.text)
            call = fp.Call(method, path, query, headers, body, controls, shape, self.models)
            reply = fp.handle(call)
        except fp.ApiError as error:
            await asyncio.sleep(fp._delay_of(headers))
            extra = {"retry-after": "1"} if error.status == 429 else {}
            content = orjson.dumps(fp.error_body(shape, error, ids.get("request-id", "")))
            json_headers = {**ids, **extra, "content-type": "application/json"}
            return Answer(error.status, json_headers, [content])
        coding = fp.choose_coding(headers, "none")
        if isinstance(reply, list):
            return await self._stream(reply, controls, ids, coding)
        await asyncio.sleep(controls.delay_s)
        pieces = _Pieces(coding)
        await pieces.write(orjson.dumps(reply))
        return Answer(200, self._headers(ids, "application/json", coding), _finish(pieces))

    async def _stream(
        self,
        events: list[fp.SseEvent],
        controls: fp.Controls,
        ids: dict[str, str],
        coding: str | None,
    ) -> Answer:
        pieces = _Pieces(coding)
        writer = fp.SseWriter(pieces, split=controls.split)
        answer_headers = self._headers(ids, "text/event-stream; charset=utf-8", coding)
        for index, event in enumerate(events):
            if index == controls.abort_after:
                await writer.flush()
                return Answer(200, answer_headers, pieces.chunks, reset=True)
            if index:
                await asyncio.sleep(controls.delay_s)
            await writer.send(event)
        await writer.flush()
        return Answer(200, answer_headers, _finish(pieces))

    @staticmethod
    def _headers(ids: dict[str, str], content_type: str, coding: str | None) -> dict[str, str]:
        out = {**ids, "content-type": content_type}
        if coding is not None:
            out["content-encoding"] = "gzip" if coding == "mislabelled" else coding
        return out


def _finish(pieces: _Pieces) -> list[bytes]:
    tail = pieces.compressor.finish() if pieces.compressor else b""
    return [*pieces.chunks, tail] if tail else pieces.chunks


Upstream = Callable[[str, str, Mapping[str, str], bytes], Awaitable[Answer]]


# ---- one ext_proc RPC ---------------------------------------------------------------------------


class RpcFailed(Exception):
    """The RPC ended with an error (or Envoy's message timeout passed) before a reply."""


class _Context:
    """The servicer side of the RPC, as grpc.aio's ServicerContext behaves."""

    def __init__(self, replies: asyncio.Queue[pb.ProcessingResponse]) -> None:
        self.replies = replies
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def write(self, response: pb.ProcessingResponse) -> None:
        self.replies.put_nowait(response)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RpcFailed(f"{code}: {details}")


class Rpc:
    """One ext_proc gRPC stream: Envoy sends a message and waits for its reply."""

    def __init__(
        self,
        servicer: ExternalProcessor,
        timeout: float,
        max_timeout: float,
        on_extend: Callable[[], None],
    ) -> None:
        self.timeout, self.max_timeout, self.on_extend = timeout, max_timeout, on_extend
        self.requests: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        self.replies: asyncio.Queue[pb.ProcessingResponse] = asyncio.Queue()
        self.context = _Context(self.replies)
        self.sent: list[pb.ProcessingRequest] = []
        self.received: list[pb.ProcessingResponse] = []
        self.task = asyncio.ensure_future(servicer.Process(self._iterate(), self.context))

    async def _iterate(self) -> AsyncIterator[pb.ProcessingRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def send(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Send one message; its reply, or `RpcFailed` (error, or message timeout)."""
        self.sent.append(request)
        self.requests.put_nowait(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            reply = await self._next(deadline - loop.time())
            if reply.HasField("override_message_timeout"):
                seconds = reply.override_message_timeout.ToNanoseconds() / 1e9
                deadline = loop.time() + min(seconds, self.max_timeout)
                self.on_extend()
                continue
            self.received.append(reply)
            return reply

    async def _next(self, seconds: float) -> pb.ProcessingResponse:
        get = asyncio.ensure_future(self.replies.get())
        await asyncio.wait(
            {get, self.task}, timeout=max(0.0, seconds), return_when="FIRST_COMPLETED"
        )
        if get.done():
            return get.result()
        get.cancel()
        if self.task.done():
            error = self.task.exception() if not self.task.cancelled() else None
            raise RpcFailed(f"the RPC ended without a reply: {error!r}")
        raise RpcFailed("Envoy's message_timeout passed")

    async def end(self) -> None:
        """Envoy ends its side (the HTTP request is over, or the client went away)."""
        self.requests.put_nowait(None)
        await self._settle()

    async def reset(self) -> None:
        """Envoy resets the RPC (an upstream reset, a message timeout)."""
        self.task.cancel()
        await self._settle()

    async def _settle(self) -> None:
        # How the RPC ended (an error, cancelled) is the caller's business, not a crash here.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self.task), 10)


# ---- what the client gets -----------------------------------------------------------------------


@dataclass
class ClientReply:
    """What the client received, and how it got there."""

    status: int
    headers: dict[str, str]
    body: bytes
    answered_by_gateway: bool = False  # an ImmediateResponse
    upstream: fp.ReceivedRequest | None = None  # what the provider received
    cluster: str | None = None
    rpc: Rpc | None = None
    extensions: int = 0  # override_message_timeout messages seen

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def events(self) -> list[Any]:
        """The SSE events' `data` parsed as JSON (`[DONE]` left out)."""
        out: list[Any] = []
        for frame in self.body.replace(b"\r\n", b"\n").split(b"\n\n"):
            for line in frame.split(b"\n"):
                if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                    out.append(orjson.loads(line[5:]))
        return out

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.json()["error"]
        return error


# ---- the stack ----------------------------------------------------------------------------------


def service_config(**overrides: Any) -> dict[str, Any]:
    """A config with one Anthropic and one OpenAI provider, both served by `FakeUpstream`."""
    data: dict[str, Any] = {
        "providers": {
            "anthropic": {"api": "anthropic", "base_url": FAKE_URL},
            "openai": {"api": "openai", "base_url": FAKE_URL},
        },
    }
    data.update(overrides)
    return data


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Exchange:
    rpc: Rpc
    request: Request


class ServiceStack:
    """The servicer on a test clock, a memory (or given) store and `FakeUpstream`."""

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        upstream: Upstream | None = None,
        clock: ManualClock | None = None,
        store: Store | None = None,
        failure_mode_allow: bool = False,
        message_timeout: float = 10.0,
        max_message_timeout: float = 120.0,
    ) -> None:
        self.data = dict(config) if config is not None else service_config()
        self.config = parse_config(self.data)
        self.clock = clock or ManualClock()
        self.fake = FakeUpstream()
        self.upstream: Upstream = upstream or self.fake
        self.sink, self.metrics = ListSink(), Metrics()
        self.gateway = Gateway.from_config(
            self.config, metrics=self.metrics, audit=self.sink, store=store, clock=self.clock
        )
        self.servicer = ExternalProcessor(self.gateway)
        self.failure_mode_allow = failure_mode_allow
        self.timeouts = (message_timeout, max_message_timeout)
        self.extensions = 0  # override_message_timeout messages, all RPCs

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.sink.records

    async def settled(self, seconds: float = 10.0) -> list[dict[str, Any]]:
        """The audit records once every stream's settle and audit work is done."""
        await self.gateway.settle_pending(seconds)
        return self.sink.records

    async def close(self) -> None:
        await self.gateway.settle_pending(10)
        await self.gateway.close()

    def _extended(self) -> None:
        self.extensions += 1

    def open_rpc(self) -> Rpc:
        return Rpc(self.servicer, *self.timeouts, on_extend=self._extended)

    async def drive(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        body: bytes | None = None,
        route: str | None = None,
        policy: Mapping[str, Any] | None = None,
        client_address: str = CLIENT_ADDRESS,
        client_abort_after: int | None = None,
        settle: bool = True,
    ) -> ClientReply:
        """One HTTP request through "Envoy" (see the module docstring); what the client got.

        `client_abort_after`: the client goes away after that many response body chunks.
        `settle`: wait for this stream's settle and audit work before returning."""
        raw = orjson.dumps(json) if json is not None else (body or b"")
        request = Request(method, path, _client_headers(headers, raw, client_address), raw)
        exchange = _Exchange(self.open_rpc(), request)
        extensions = self.extensions
        try:
            reply = await self._request_phase(exchange, route, policy)
            if reply is None:
                reply = await self._response_phase(exchange, client_abort_after)
        finally:
            if not exchange.rpc.task.done():
                await exchange.rpc.end()
        reply.rpc = exchange.rpc
        reply.extensions = self.extensions - extensions  # (concurrent drives' too)
        if settle:
            pending = set(getattr(self.gateway, "pending", ()))
            if pending:
                await asyncio.wait(pending, timeout=10)
        return reply

    # -- request path --------------------------------------------------------------------------

    async def _request_phase(
        self, exchange: _Exchange, route: str | None, policy: Mapping[str, Any] | None
    ) -> ClientReply | None:
        request, rpc = exchange.request, exchange.rpc
        name, metadata = _route_of(request.path)
        message = request_headers(
            request.path,
            request.method,
            eos=not request.body,
            extra=request.headers,
            route=route or name,
            policy=metadata if policy is None else policy,
        )
        try:
            reply = await rpc.send(message)
            if (done := self._immediate(reply)) is not None:
                return done
            _mutate_request(request, reply.request_headers.response)
            if request.body:
                reply = await rpc.send(request_body(request.body))
                if (done := self._immediate(reply)) is not None:
                    return done
                _mutate_request(request, reply.request_body.response)
        except RpcFailed:
            await rpc.reset()
            if not self.failure_mode_allow:
                return _unavailable(request.path)
        return None

    def _immediate(self, reply: pb.ProcessingResponse) -> ClientReply | None:
        if not reply.HasField("immediate_response"):
            return None
        immediate = reply.immediate_response
        out: dict[str, str] = {}
        _apply_header_mutation(out, immediate.headers)
        status = immediate.status.code or 200
        return ClientReply(status, out, bytes(immediate.body), answered_by_gateway=True)

    # -- response path -------------------------------------------------------------------------

    async def _response_phase(
        self, exchange: _Exchange, client_abort_after: int | None
    ) -> ClientReply:
        rpc = exchange.rpc
        answer, reply = await self._forward(exchange.request)
        if rpc.task.done():  # the gateway already ended the RPC: Envoy passes the rest on
            reply.body = b"".join(answer.chunks)
            return reply
        try:
            return await self._answer(rpc, answer, reply, client_abort_after)
        except RpcFailed:
            await rpc.reset()
            if not self.failure_mode_allow:
                return _unavailable(exchange.request.path)
            reply.body = b"".join(answer.chunks)
            return reply

    async def _forward(self, request: Request) -> tuple[Answer, ClientReply]:
        """Route (`x-gateway-cluster`), strip gateway keys (the Lua filter), call the
        provider; the client's reply so far holds the provider's status and headers."""
        cluster = request.headers.pop("x-gateway-cluster", None) or _default_cluster(request.path)
        upstream_headers = _lua_strip_gateway_keys(_upstream_headers(request.headers))
        answer = await self.upstream(request.method, request.path, upstream_headers, request.body)
        out = dict(answer.headers)
        if not answer.reset and len(answer.chunks) == 1:
            out["content-length"] = str(len(answer.chunks[0]))
        else:
            out["transfer-encoding"] = "chunked"
        reply = ClientReply(answer.status, out, b"", upstream=answer.request, cluster=cluster)
        return answer, reply

    async def _answer(
        self, rpc: Rpc, answer: Answer, reply: ClientReply, client_abort_after: int | None
    ) -> ClientReply:
        """Response headers, then the body in the mode the gateway chose (NONE by default)."""
        out, no_body = reply.headers, not answer.chunks and not answer.reset
        extra = {k: v for k, v in out.items() if k != "content-type"}
        message = response_headers(reply.status, out.get("content-type", ""), extra, eos=no_body)
        got = await rpc.send(message)
        if (done := self._immediate(got)) is not None:
            return done
        _apply_header_mutation(out, got.response_headers.response.header_mutation)
        reply.status = int(out.pop(":status", str(reply.status)))
        mode = got.mode_override.response_body_mode if got.HasField("mode_override") else _MODE.NONE
        if no_body or mode == _MODE.NONE:
            reply.body = b"".join(answer.chunks)
        elif mode == _MODE.BUFFERED:
            reply.body = await self._buffered(rpc, answer, reply)
        else:
            reply.body = await self._streamed(rpc, answer, client_abort_after)
        return reply

    async def _buffered(self, rpc: Rpc, answer: Answer, reply: ClientReply) -> bytes:
        """The whole body in one message. Envoy holds the headers back until this reply,
        so its header mutation (a new `:status`) still applies; in STREAMED mode it cannot."""
        whole = b"".join(answer.chunks)
        if answer.reset:  # Envoy half-closes the RPC; the client gets the cut answer
            await rpc.end()
            return whole
        got = await rpc.send(response_body(whole, eos=True))
        if (done := self._immediate(got)) is not None:
            reply.status, reply.headers = done.status, done.headers
            return done.body
        common = got.response_body.response
        reply.headers[":status"] = str(reply.status)
        _apply_header_mutation(reply.headers, common.header_mutation)
        reply.status = int(reply.headers.pop(":status"))
        return _body_after(common, whole)

    async def _streamed(self, rpc: Rpc, answer: Answer, client_abort_after: int | None) -> bytes:
        out: list[bytes] = []
        for index, chunk in enumerate(answer.chunks):
            if client_abort_after is not None and index == client_abort_after:
                await rpc.end()  # the client went away: Envoy ends the RPC
                return b"".join(out)
            got = await rpc.send(response_body(chunk, eos=False))
            out.append(_body_after(got.response_body.response, chunk))
        if answer.reset:  # the provider's connection reset: Envoy half-closes the RPC too
            await rpc.end()
            return b"".join(out)
        got = await rpc.send(response_body(b"", eos=True))
        out.append(_body_after(got.response_body.response, b""))
        return b"".join(out)


# ---- Envoy's own header handling ----------------------------------------------------------------


def _client_headers(
    given: Mapping[str, str] | None, body: bytes, client_address: str
) -> dict[str, str]:
    out = {k.lower(): v for k, v in (given or {}).items()}
    out.pop("x-gateway-cluster", None)  # the header_mutation filter: clients cannot route
    out.setdefault("x-request-id", f"envoy-{next(_ids)}")
    forwarded = out.get("x-forwarded-for")
    out["x-forwarded-for"] = f"{forwarded}, {client_address}" if forwarded else client_address
    out.setdefault("content-type", "application/json")
    if body:
        out["content-length"] = str(len(body))
    return out


def _route_of(path: str) -> tuple[str, dict[str, Any]]:
    """The front-proxy template's routes: `openai` for the OpenAI paths, else `anthropic`,
    both with the `default` profile."""
    name = "openai" if _OPENAI_PATHS.match(path) else "anthropic"
    return name, {"profile": "default"}


def _default_cluster(path: str) -> str:
    return "provider_anthropic"


def _apply_header_mutation(target: dict[str, str], mutation: pb.HeaderMutation) -> None:
    for option in mutation.set_headers:
        value = option.header.raw_value.decode() if option.header.raw_value else option.header.value
        target[option.header.key.lower()] = value
    for name in mutation.remove_headers:
        target.pop(name.lower(), None)


def _mutate_request(request: Request, common: pb.CommonResponse) -> None:
    headers = {":path": request.path, ":method": request.method, **request.headers}
    _apply_header_mutation(headers, common.header_mutation)
    request.path = headers.pop(":path")
    request.method = headers.pop(":method")
    request.headers = headers
    if common.HasField("body_mutation"):
        request.body = _body_after(common, request.body)
        if "content-length" in headers:
            # Envoy forwards the header as given; a stale length breaks the upstream request.
            assert headers["content-length"] == str(len(request.body)), "stale content-length"


def _body_after(common: pb.CommonResponse, original: bytes) -> bytes:
    if not common.HasField("body_mutation"):
        return original
    if common.body_mutation.WhichOneof("mutation") == "clear_body":
        return b"" if common.body_mutation.clear_body else original
    return bytes(common.body_mutation.body)


def _upstream_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if not k.startswith(":")}


def _lua_strip_gateway_keys(headers: dict[str, str]) -> dict[str, str]:
    """The front proxy's Lua filter: a gateway key or SSO token never leaves."""
    key = headers.get("x-api-key", "")
    if key.lstrip().startswith("gwk_"):
        headers.pop("x-api-key")
    auth = headers.get("authorization", "")
    if re.match(r"^\s*bearer\s+gwk_", auth, re.I) or re.match(r"^\s*[Bb]earer\s+eyJ", auth):
        headers.pop("authorization")
    return headers


def _unavailable(path: str) -> ClientReply:
    """The front proxy's local reply when ext_proc fails (failure_mode_allow off)."""
    message = "the gateway is unavailable; retry shortly"
    if _OPENAI_PATHS.match(path):
        error: dict[str, Any] = {
            "error": {
                "message": message,
                "type": "gateway_error",
                "param": None,
                "code": "gateway_unavailable",
            }
        }
    else:
        error = {"type": "error", "error": {"type": "api_error", "message": message}}
    headers = {"content-type": "application/json", "x-gateway-error": "gateway_unavailable"}
    return ClientReply(503, headers, orjson.dumps(error))
