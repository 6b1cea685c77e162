"""The one error boundary (issue 10 item 2), phase by phase without sockets: a cached answer
the guard withholds, a store outage and an unexpected exception all answer in the caller's
shape with their reason, `x-should-retry` and an audit record with the status sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc import stream as stream_module
from extproc.apis import anthropic
from extproc.apis.sse import SseParser
from extproc.config import parse_config
from extproc.decisions import Continue, Respond
from extproc.gateway import Gateway
from extproc.policies.cache import CacheRun
from extproc.store import StoreError
from extproc.store.memory import MemoryStore
from extproc.stream import RequestStream
from extproc.telemetry.metrics import Metrics
from tests.service.test_guard_and_bounds import ANSWER, HEADERS, ListSink, ask, call, gateway

BLOCKING = {"profiles": {"default": {"output": {"deny": [{"id": "no_echo", "phrase": "echo "}]}}}}


def records(gw: Gateway) -> list[dict[str, Any]]:
    sink = gw.audit
    assert isinstance(sink, ListSink)
    return sink.records


def assert_refusal(response: Respond, status: int, reason: str, retry: str) -> None:
    headers = dict(response.headers)
    assert response.status == status
    assert headers["x-gateway-error"] == reason
    assert headers["x-should-retry"] == retry
    assert headers["x-gateway-request-id"]
    assert orjson.loads(response.body)["type"] == "error"  # the Anthropic caller's shape


async def test_a_cached_answer_the_guard_withholds_is_a_502_not_retried() -> None:
    store = MemoryStore()
    plain = gateway(store, guard=False)
    await call(plain, ask(), orjson.dumps(ANSWER))  # stored by a route without the guard
    blocking = parse_config({"guard": BLOCKING}).guard
    guarded = Gateway.from_config(
        plain.config.model_copy(update={"guard": blocking}),
        metrics=Metrics(),
        audit=ListSink(),
        store=store,
    )
    hit, _ = await call(guarded, ask())
    assert isinstance(hit, Respond)
    assert_refusal(hit, 502, "output_blocked", "false")
    (record,) = records(guarded)
    assert (record["status"], record["outcome"]) == (502, "error")
    assert record["error_type"] == "output_blocked"


async def test_a_store_outage_anywhere_is_store_down(monkeypatch: pytest.MonkeyPatch) -> None:
    gw = gateway(MemoryStore(), guard=False)

    async def down(self: CacheRun, *args: object) -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(CacheRun, "request", down)
    decision, _ = await call(gw, ask())
    assert isinstance(decision, Respond)
    assert_refusal(decision, 503, "store_down", "true")
    (record,) = records(gw)
    assert (record["status"], record["outcome"]) == (503, "rejected_store_down")


async def test_an_unexpected_exception_is_a_500_in_the_callers_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = gateway(MemoryStore(), guard=False)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(stream_module, "parse_request", broken)
    decision, _ = await call(gw, ask())
    assert isinstance(decision, Respond)
    assert_refusal(decision, 500, "internal", "false")
    assert "a bug" not in decision.body.decode()  # logged, never sent
    (record,) = records(gw)
    assert (record["status"], record["outcome"]) == (500, "rejected_internal")


async def test_a_failure_mid_stream_ends_it_with_an_error_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = gateway(MemoryStore(), guard=False)
    s = RequestStream(gw)
    await s.request_headers(dict(HEADERS), False)
    await s.request_body(ask(True), True)
    await s.response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    events = anthropic.unfold_message(ANSWER)
    half = len(events) // 2
    first = await s.response_body(events[:half], False)
    assert isinstance(first, Continue)

    def broken(self: RequestStream, chunk: bytes, end_of_stream: bool) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(RequestStream, "_on_response_body", broken)
    failed = await s.response_body(events[half:], False)
    assert isinstance(failed, Continue)
    assert failed.body is not None
    (error,) = SseParser().feed(failed.body)
    assert error.event == "error"
    assert orjson.loads(error.data)["error"]["type"] == "api_error"
    rest = await s.response_body(b"event: ping\ndata: {}\n\n", True)
    assert isinstance(rest, Continue)
    assert rest.body == b""
    await s.close()
    (record,) = records(gw)
    assert (record["status"], record["outcome"]) == (200, "error")  # the status had left
    assert record["error_type"] == "internal"
