"""A request stream's guard and limits, fed phase by phase (no sockets): cached answers are
screened on replay, and only screened answers are stored."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Coroutine, Generator
from typing import Any

import orjson

from extproc.apis import anthropic
from extproc.apis.sse import SseParser
from extproc.config import parse_config
from extproc.decisions import Continue, Decision, Respond
from extproc.gateway import Gateway
from extproc.offload import OFFLOAD_BYTES
from extproc.store.memory import MemoryStore
from extproc.stream import RequestStream
from extproc.telemetry.metrics import Metrics

GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        return None


def gateway(store: MemoryStore, *, guard: bool, **extra: Any) -> Gateway:
    config: dict[str, Any] = {
        "providers": {
            "main": {
                "api": "anthropic",
                "base_url": "https://llm.internal",
                "credential": {"value": "sk"},
            }
        },
        "profiles": {"default": {"cache": {"enabled": True}}},
        **extra,
    }
    if guard:
        config["guard"] = {"profiles": {"default": {}}}
    return Gateway.from_config(
        parse_config(config), metrics=Metrics(), audit=ListSink(), store=store
    )


HEADERS = {
    ":method": "POST",
    ":path": "/v1/messages",
    "content-type": "application/json",
    "x-api-key": "k",
}
ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-opus-4-8",
    "content": [
        {"type": "thinking", "thinking": f"key {GH}", "signature": "s"},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": f"echo {GH}"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 5},
}


def ask(stream: bool = False) -> bytes:
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 50,
        "stream": stream,
        "messages": [{"role": "user", "content": "deploy"}],
    }
    return orjson.dumps(body)


async def call(
    gw: Gateway, body: bytes, answer: bytes | None = None, sse: bool = False
) -> tuple[Decision, bytes]:
    """One request; (the request-body decision, what the client got back)."""
    s = RequestStream(gw)
    await s.request_headers(dict(HEADERS), False)
    decision = await s.request_body(body, True)
    got = b""
    if not isinstance(decision, Respond) and answer is not None:
        content_type = "text/event-stream" if sse else "application/json"
        await s.response_headers({":status": "200", "content-type": content_type}, False)
        reply = await s.response_body(answer, True)
        changed = reply.body if isinstance(reply, Continue) else None
        got = changed if changed is not None else answer
    await s.close()
    return decision, got


async def test_an_answer_cached_before_the_guard_is_screened_on_replay() -> None:
    store = MemoryStore()
    plain, guarded = gateway(store, guard=False), gateway(store, guard=True)
    await call(plain, ask(), orjson.dumps(ANSWER))  # stored unscreened, as before the guard
    for streamed in (False, True):
        hit, _ = await call(guarded, ask(streamed))
        assert isinstance(hit, Respond)
        assert dict(hit.headers)["x-gateway-cache"] == "hit"
        assert GH not in hit.body.decode()
        assert "[REDACTED:github_token:" in hit.body.decode()


async def test_only_the_screened_stream_is_stored() -> None:
    store = MemoryStore()
    guarded, plain = gateway(store, guard=True), gateway(store, guard=False)
    _, sent = await call(guarded, ask(True), anthropic.unfold_message(ANSWER), sse=True)
    parser, acc = SseParser(), anthropic.StreamAccumulator()
    for event in parser.feed(sent) + parser.close():
        acc.feed(event)
    assert GH not in orjson.dumps(acc.folded_message()).decode()
    hit, _ = await call(plain, ask(True))  # even a route without a guard replays it screened
    assert isinstance(hit, Respond)
    assert dict(hit.headers)["x-gateway-cache"] == "hit"
    assert GH not in hit.body.decode()


# -- bounded work per request ------------------------------------------------------------

MiB = 1 << 20


def worst_legal_body() -> bytes:
    """As heavy as the default limits allow: ~31 MiB, 180,000 JSON values, 15 M characters
    for the guard to scan (text blocks) and 15 MiB it must skip (base64 images)."""
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": f"line {i} " + "lorem ipsum " * 20} for i in range(60_000)
    ]
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "QUJD" * (MiB // 4)},
    }
    content = blocks + [image] * 15
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": content}],
    }
    raw = orjson.dumps(body)
    assert 30 * MiB < len(raw) < 32 * MiB
    return raw


def tiny_blocks_body() -> bytes:
    """The attack: 31 MiB of 1.2 million tiny content blocks."""
    block = b'{"type":"text","text":"hi"},'
    count = (31 * MiB) // len(block)
    head = b'{"model":"claude-opus-4-8","max_tokens":5,"messages":[{"role":"user","content":['
    return head + block * (count - 1) + block[:-1] + b"]}]}"


async def probe(gw: Gateway, due: float) -> float:
    """One small request from another caller that arrives at `due` (loop time): its
    latency from then, so time the loop spent busy before it could start counts too."""
    loop = asyncio.get_running_loop()
    await call(gw, ask(), orjson.dumps({**ANSWER, "content": [{"type": "text", "text": "ok"}]}))
    return loop.time() - due


async def latencies_while(gw: Gateway, work: asyncio.Future[Any] | None) -> list[float]:
    """Another caller's latencies, one request due every 5 ms whatever the loop is doing
    (open loop), while `work` runs (None: for one second, as a baseline)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + (120 if work is not None else 1)
    probes: list[asyncio.Future[float]] = []
    while (due := start + len(probes) * 0.005) < end:
        finished = work is None or (work.done() and len(probes) >= 20)
        if due > loop.time():
            if finished and work is not None:
                break  # every request due while the work ran has been sent
            await asyncio.sleep(due - loop.time())
        probes.append(asyncio.ensure_future(probe(gw, due)))
    return list(await asyncio.gather(*probes))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Steps:
    """Runs a coroutine and notes the longest of its steps (from one await to the next)
    in CPU time of the loop's thread: how long the request's own work held the event
    loop. Unlike wall time, a busy machine preempting the process does not stretch it,
    nor do other callers' requests that pile up meanwhile."""

    def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.coroutine = coroutine
        self.longest = 0.0

    def __await__(self) -> Generator[Any, Any, Any]:
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            start = time.thread_time()
            try:
                if thrown is not None:
                    waited = self.coroutine.throw(thrown)
                else:
                    waited = self.coroutine.send(sent)
            except StopIteration as done:
                return done.value
            finally:
                self.longest = max(self.longest, time.thread_time() - start)
            try:
                sent, thrown = (yield waited), None
            except BaseException as error:  # delivered to the coroutine, as a Task would
                sent, thrown = None, error


async def _awaited(steps: Steps) -> Any:
    return await steps


async def measure(raw: bytes) -> tuple[Decision, list[float], list[float], float]:
    """(the heavy request's decision, another caller's latencies alone, and meanwhile,
    the heavy request's longest step on the loop): all measured in this run."""
    gw = gateway(MemoryStore(), guard=True, cache={"hygiene": True})
    assert gw.offload is not None
    await gw.offload.warm()
    try:
        baseline = await latencies_while(gw, None)
        steps = Steps(call(gw, raw, orjson.dumps(ANSWER)))
        heavy = asyncio.ensure_future(_awaited(steps))
        seen = await latencies_while(gw, heavy)
        decision, _ = await heavy
    finally:
        await gw.close()
    return decision, baseline, seen, steps.longest


def summary(baseline: list[float], seen: list[float], busy: float) -> str:
    return (
        f"p99 {p99(seen) * 1e3:.1f} ms, worst {max(seen) * 1e3:.1f} ms over {len(seen)} "
        f"requests; alone p99 {p99(baseline) * 1e3:.1f} ms; the request's longest step "
        f"on the loop {busy * 1e3:.1f} ms CPU"
    )


async def test_a_flood_of_tiny_blocks_does_not_stall_other_callers() -> None:
    """The attack: 31 MiB of 1.2 million tiny blocks. Refused with 413 by the worker; the
    request never holds the loop for more than a few ms of its CPU. (Another caller's
    latency meanwhile depends on the machine's load: bench/loop_stall_bench.py.)"""
    decision, baseline, seen, busy = await measure(tiny_blocks_body())
    print("tiny blocks:", summary(baseline, seen, busy))
    assert isinstance(decision, Respond)
    assert decision.status == 413
    assert dict(decision.headers)["x-gateway-error"] == "too_many_values"
    assert busy < 0.050, summary(baseline, seen, busy)


async def test_the_heaviest_legal_request_pauses_other_callers_only_briefly() -> None:
    """31 MiB, 180,000 values, 15 M characters to screen: parsed, checked, screened,
    measured (token estimate, cache key digests) and summarized in the worker (seconds of
    CPU); the loop never walks the body's big values (they stay serialized), so the
    request's longest step there is a few ms of CPU (issue 11 item 12: 130-170 ms when
    the loop parsed and hashed the body, 16 s of 504s before the worker). The loop CPU
    is asserted because a busy machine does not stretch it; another caller's latency
    meanwhile depends on the machine's load and is measured by bench/loop_stall_bench.py."""
    decision, baseline, seen, busy = await measure(worst_legal_body())
    print("heaviest legal:", summary(baseline, seen, busy))
    assert isinstance(decision, Continue)
    assert decision.body is None  # nothing changed: forwarded as sent
    assert busy < 0.050, summary(baseline, seen, busy)


async def test_duplicate_key_is_a_400_in_the_callers_shape() -> None:
    gw = gateway(MemoryStore(), guard=False)
    body = b'{"model":"claude-haiku-4-5","max_tokens":5,"model":"claude-opus-4-8","messages":[]}'
    decision, _ = await call(gw, body)
    assert isinstance(decision, Respond)
    assert decision.status == 400
    assert dict(decision.headers)["x-gateway-error"] == "duplicate_key"
    error = orjson.loads(decision.body)
    assert error["type"] == "error"
    assert "'model'" in error["error"]["message"]


async def test_too_much_text_to_screen_is_a_413() -> None:
    gw = gateway(MemoryStore(), guard=True, limits={"max_scan_chars": 4096})
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x" * 5000}],
    }
    decision, _ = await call(gw, orjson.dumps(body))
    assert isinstance(decision, Respond)
    assert decision.status == 413
    assert dict(decision.headers)["x-gateway-error"] == "too_much_text"
    assert "limits.max_scan_chars" in orjson.loads(decision.body)["error"]["message"]


async def test_too_many_values_in_a_small_body_is_a_413_without_the_worker() -> None:
    gw = gateway(MemoryStore(), guard=False, limits={"max_json_values": 1000})
    gw.offload = None  # the in-process path enforces the same cap
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 400}],
    }
    decision, _ = await call(gw, orjson.dumps(body))
    assert isinstance(decision, Respond)
    assert (decision.status, dict(decision.headers)["x-gateway-error"]) == (413, "too_many_values")


async def test_a_big_body_is_refused_by_the_worker_in_the_callers_shape() -> None:
    gw = gateway(MemoryStore(), guard=True)
    padding = orjson.dumps("x" * (2 * MiB)).decode()
    body = f'{{"model":"gpt-5","messages":[{{"role":"user","content":{padding}}}],"messages":[]}}'
    try:
        s = RequestStream(gw)
        await s.request_headers({**HEADERS, ":path": "/v1/chat/completions"}, False)
        decision = await s.request_body(body.encode(), True)
        await s.close()
    finally:
        await gw.close()
    assert isinstance(decision, Respond)
    assert (decision.status, dict(decision.headers)["x-gateway-error"]) == (400, "duplicate_key")
    assert "'messages'" in orjson.loads(decision.body)["error"]["message"]  # OpenAI shape


async def test_cache_hygiene_records_stay_small() -> None:
    from extproc.policies.cache import SHAPE_MAX_ENTRY, SHAPE_PREFIX

    store = MemoryStore()
    gw = gateway(store, guard=False, cache={"hygiene": True})
    small = {
        "model": "claude-opus-4-8",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    many = [{"type": "text", "text": f"block {i}"} for i in range(12_000)]  # a 130 KB record
    large = "x" * (3 * MiB)  # over the body cap
    for content in ("hi", many, large):
        body = {**small, "messages": [{"role": "user", "content": content}]}
        await call(gw, orjson.dumps(body), orjson.dumps(ANSWER))
    names = await store.scan(SHAPE_PREFIX, limit=100)
    assert len(names) == 1  # only the small request was shaped
    raw = await store.get(names[0])
    assert raw is not None
    assert len(raw) <= SHAPE_MAX_ENTRY
    await gw.close()


async def test_a_dead_worker_is_a_503_and_the_next_request_gets_a_new_one() -> None:
    gw = gateway(MemoryStore(), guard=True)
    offload = gw.offload
    assert offload is not None
    await offload.warm()
    pool = offload._pool
    assert pool is not None
    (pid,) = list(pool._processes)  # the worker this test started
    os.kill(pid, signal.SIGKILL)
    dup = b'{"model":"m","model":"n","pad":"' + b"x" * (300 << 10) + b'"}'
    try:
        decision, _ = await call(gw, dup)
        assert isinstance(decision, Respond)
        assert (decision.status, dict(decision.headers)["x-gateway-error"]) == (503, "worker_died")
        decision, _ = await call(gw, dup)  # a new worker checks it
        assert isinstance(decision, Respond)
        assert (decision.status, dict(decision.headers)["x-gateway-error"]) == (
            400,
            "duplicate_key",
        )
    finally:
        await gw.close()


async def test_a_heavy_body_is_screened_measured_and_keyed_in_the_worker() -> None:
    """A body over the offload threshold: the worker redacts it, and the loop keeps its
    big values serialized (never parsed there); what is forwarded is the redacted body,
    and the same request again is a cache hit (its key from the worker's digests)."""
    gw = gateway(MemoryStore(), guard=True)
    padding = [{"type": "text", "text": f"line {i} " + "lorem " * 30} for i in range(2000)]
    content = [*padding, {"type": "text", "text": f"my token {GH}"}]
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": content}],
    }
    raw = orjson.dumps(body)
    assert len(raw) > OFFLOAD_BYTES
    try:
        s = RequestStream(gw)
        await s.request_headers(dict(HEADERS), False)
        decision = await s.request_body(raw, True)
        assert s.request is not None
        assert isinstance(s.request.body["messages"], orjson.Fragment)
        assert s.request.body["max_tokens"] == 50  # small values are parsed as usual
        await s.response_headers({":status": "200", "content-type": "application/json"}, False)
        await s.response_body(orjson.dumps(ANSWER), True)
        await s.close()
        again, _ = await call(gw, raw, orjson.dumps(ANSWER))
    finally:
        await gw.close()
    assert isinstance(decision, Continue)
    assert decision.body is not None
    assert GH.encode() not in decision.body
    sent = orjson.loads(decision.body)
    assert sent["messages"][0]["content"][:2000] == padding
    assert sent["model"] == "claude-opus-4-8"
    assert isinstance(again, Respond)
    assert dict(again.headers)["x-gateway-cache"] == "hit"


async def test_a_heavy_body_keeps_the_cache_key_normalization() -> None:
    """The worker digests a heavy body's big values under the profile's normalization:
    two big requests that differ only in a UUID share one cache entry."""
    cache = {"enabled": True, "normalize": [{"builtin": "uuids"}]}
    gw = gateway(MemoryStore(), guard=False, profiles={"default": {"cache": cache}})
    padding = [{"type": "text", "text": f"line {i} " + "lorem " * 30} for i in range(2000)]

    def heavy(run: str) -> bytes:
        content = [{"type": "text", "text": f"run {run}"}, *padding]
        messages = [{"role": "user", "content": content}]
        return orjson.dumps({"model": "claude-opus-4-8", "max_tokens": 50, "messages": messages})

    try:
        first, _ = await call(
            gw, heavy("0b6f7e9a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"), orjson.dumps(ANSWER)
        )
        second, _ = await call(
            gw, heavy("9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"), orjson.dumps(ANSWER)
        )
    finally:
        await gw.close()
    assert isinstance(first, Continue)
    assert isinstance(second, Respond)
    assert dict(second.headers)["x-gateway-cache"] == "hit"
