"""Spend is settled for every stream however it ends (issue 11, items 1-3 and 7).

The servicer is fed scripted ProcessingRequests (no sockets): a stream cut before its
final usage is billed from what was streamed, OpenAI streams always carry usage, the
reservation is an upper bound, and a request cancelled mid-admission leaves no hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.policies.budget import Scope
from extproc.policies.budget.spending import tokens_for_bytes
from extproc.server import ExternalProcessor
from extproc.telemetry.metrics import Metrics
from tests.service.test_servicer import (
    Context,
    ListSink,
    request_body,
    request_headers,
    response_body,
    response_headers,
    run,
)

KEY = "gwk_alice_" + "s" * 40


def gateway(sink: ListSink, **extra: Any) -> ExternalProcessor:
    from extproc.policies.auth import hash_key

    config = parse_config(
        {
            "providers": {
                "main": {
                    "api": "anthropic",
                    "base_url": "https://llm.internal",
                    "credential": {"value": "sk-held"},
                },
                "oai": {
                    "api": "openai",
                    "base_url": "http://vllm:8000",
                    "credential": {"value": "sk-oai"},
                },
            },
            "auth": {"keys": [{"id": "alice", "hash": hash_key(KEY), "team": "red"}]},
            "budgets": {"rules": [{"scope": "team", "window": "lifetime", "usd": 100}]},
            **extra,
        }
    )
    return ExternalProcessor(Gateway.from_config(config, metrics=Metrics(), audit=sink))


def anthropic_events(text: str, *, final: bool) -> bytes:
    usage = {"input_tokens": 20, "output_tokens": 1}
    start = {"type": "message_start", "message": {"model": "claude-opus-4-8", "usage": usage}}
    events: list[dict[str, Any]] = [
        start,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        for w in text.split(" ")
    ]
    if final:
        events += [
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 5},
            },
            {"type": "message_stop"},
        ]
    return b"".join(
        f"event: {e['type']}\ndata: ".encode() + orjson.dumps(e) + b"\n\n" for e in events
    )


STREAM_BODY = orjson.dumps(
    {"model": "claude-opus-4-8", "max_tokens": 400, "stream": True, "messages": []}
)
AUTH = {"x-api-key": KEY}


async def team_used(servicer: ExternalProcessor) -> int:
    ledger = servicer.gateway.spending.ledger
    return (await ledger.status([Scope("team", "red")]))[0].used


async def test_stream_aborted_before_message_delta_pays_for_what_was_streamed() -> None:
    sink = ListSink()
    servicer = gateway(sink)
    text = "word " * 300  # 1,500 characters streamed, then the client is gone
    await run(
        servicer,
        [
            request_headers("/v1/messages", extra=AUTH),
            request_body(STREAM_BODY),
            response_headers(200, "text/event-stream"),
            response_body(anthropic_events(text.strip(), final=False), eos=False),
        ],
    )
    (record,) = sink.records
    assert record["outcome"] == "client_abort"
    assert record["usage_estimated"] is True
    streamed = len(text.strip().replace(" ", "").encode())
    assert record["output_tokens"] == tokens_for_bytes(streamed) > 1
    assert record["input_tokens"] == 20  # message_start reported it
    assert record["cost_usd"] > 0.0001  # no longer the price of one token
    assert await team_used(servicer) == round(record["cost_usd"] * 1e6)


async def test_stream_reset_mid_answer_is_billed_for_what_was_seen() -> None:
    """A reset (cancelled) RPC mid-answer says nothing of who cut it (Envoy closes the
    stream alike for both sides): a cut stream, `client_abort` until Envoy's response
    flags correct it (`extproc reconcile`), billed for what was streamed."""
    sink = ListSink()
    servicer = gateway(sink)
    context, more = Context(), asyncio.Event()

    async def script() -> AsyncIterator[pb.ProcessingRequest]:
        yield request_headers("/v1/messages", extra=AUTH)
        yield request_body(STREAM_BODY)
        yield response_headers(200, "text/event-stream")
        yield response_body(anthropic_events("one two three", final=False), eos=False)
        await more.wait()  # Envoy resets the RPC here

    task = asyncio.ensure_future(servicer.Process(script(), context))
    for _ in range(100):
        if len(context.written) == 4:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait_for(servicer.gateway.settle_pending(5), 6)
    (record,) = sink.records
    assert record["outcome"] == "client_abort"
    assert record["usage_estimated"] is True
    assert record["output_tokens"] == tokens_for_bytes(len(b"onetwothree"))


async def test_stream_with_final_usage_is_billed_as_reported() -> None:
    sink = ListSink()
    servicer = gateway(sink)
    await run(
        servicer,
        [
            request_headers("/v1/messages", extra=AUTH),
            request_body(STREAM_BODY),
            response_headers(200, "text/event-stream"),
            response_body(anthropic_events("a b c d e", final=True), eos=True),
        ],
    )
    (record,) = sink.records
    assert (record["outcome"], record["output_tokens"]) == ("ok", 5)
    assert "usage_estimated" not in record


async def test_stream_ended_without_final_event_is_truncated() -> None:
    sink = ListSink()
    await run(
        gateway(sink),
        [
            request_headers("/v1/messages", extra=AUTH),
            request_body(STREAM_BODY),
            response_headers(200, "text/event-stream"),
            response_body(anthropic_events("some words", final=False), eos=True),
        ],
    )
    (record,) = sink.records
    assert record["outcome"] == "truncated"
    assert record["output_tokens"] == tokens_for_bytes(len(b"somewords"))


async def test_client_gone_before_the_answer_pays_the_input_estimate() -> None:
    sink = ListSink()
    await run(
        gateway(sink),
        [request_headers("/v1/messages", extra=AUTH), request_body(STREAM_BODY)],
    )
    (record,) = sink.records
    assert record["outcome"] == "client_abort"
    assert record["input_tokens"] == tokens_for_bytes(len(STREAM_BODY))
    assert record["output_tokens"] == 0


# ---- OpenAI: usage is always asked for ------------------------------------------------------

USAGE_CHUNK = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}\n\n'
CONTENT_CHUNK = (
    b'data: {"id":"c","model":"gpt-5","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
)


def oai_request(body: dict[str, Any]) -> list[pb.ProcessingRequest]:
    return [
        request_headers("/v1/chat/completions", extra={"authorization": f"Bearer {KEY}"}),
        request_body(orjson.dumps(body)),
    ]


async def test_openai_stream_gets_include_usage_and_client_never_sees_the_chunk() -> None:
    sink = ListSink()
    body = {"model": "gpt-5", "stream": True, "max_completion_tokens": 100, "messages": []}
    replies = await run(
        gateway(sink),
        [
            *oai_request(body),
            response_headers(200, "text/event-stream"),
            response_body(CONTENT_CHUNK + USAGE_CHUNK[:30], eos=False),
            response_body(USAGE_CHUNK[30:] + b"data: [DONE]\n\n", eos=True),
        ],
    )
    sent = orjson.loads(replies[1].request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert "content-length" in replies[2].response_headers.response.header_mutation.remove_headers
    out = b"".join(r.response_body.response.body_mutation.body for r in replies[3:])
    assert out == CONTENT_CHUNK + b"data: [DONE]\n\n"
    (record,) = sink.records
    assert (record["input_tokens"], record["output_tokens"]) == (9, 4)
    assert record["cost_usd"] > 0


async def test_openai_client_that_asked_for_usage_gets_it_untouched() -> None:
    sink = ListSink()
    body = {
        "model": "gpt-5",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 100,
        "messages": [],
    }
    replies = await run(
        gateway(sink),
        [
            *oai_request(body),
            response_headers(200, "text/event-stream"),
            response_body(CONTENT_CHUNK + USAGE_CHUNK + b"data: [DONE]\n\n", eos=True),
        ],
    )
    assert not replies[1].request_body.response.HasField("body_mutation")
    assert not replies[3].response_body.response.HasField("body_mutation")


# ---- the reservation is an upper bound --------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_completion_tokens", 128_000, {"max_completion_tokens": 1000}),
        ("max_tokens", 128_000, {"max_tokens": 1000}),
        (None, None, {"max_completion_tokens": 1000}),
        ("max_completion_tokens", 50, {"max_completion_tokens": 50}),
    ],
)
async def test_openai_output_limit_is_rewritten_to_the_reserved_cap(
    field: str | None, value: int | None, expected: dict[str, int]
) -> None:
    servicer = gateway(ListSink(), limits={"max_output_tokens": 1000})
    body: dict[str, Any] = {"model": "gpt-5", "messages": []}
    if field is not None:
        body[field] = value
    replies = await run(servicer, oai_request(body))
    mutation = replies[1].request_body.response.body_mutation.body
    sent = orjson.loads(mutation) if mutation else body
    assert {k: sent[k] for k in expected} == expected


async def test_anthropic_max_tokens_and_thinking_budget_are_capped() -> None:
    servicer = gateway(ListSink(), limits={"max_output_tokens": 2000})
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 128_000,
        "thinking": {"type": "enabled", "budget_tokens": 50_000},
        "messages": [],
    }
    replies = await run(
        servicer, [request_headers("/v1/messages", extra=AUTH), request_body(orjson.dumps(body))]
    )
    sent = orjson.loads(replies[1].request_body.response.body_mutation.body)
    assert sent["max_tokens"] == 2000
    assert sent["thinking"]["budget_tokens"] == 1999


async def test_concurrent_large_requests_never_pass_the_budget() -> None:
    """12 concurrent gpt-5 calls asking for 128k output each against $5: each admitted one
    may generate only what it reserved for, so even at full length spend stays within $5."""
    servicer = gateway(
        ListSink(),
        budgets={"rules": [{"scope": "team", "window": "lifetime", "usd": 5}]},
        limits={"max_output_tokens": 64_000},
    )
    body = {"model": "gpt-5", "max_completion_tokens": 128_000, "messages": []}
    arrived, everyone_decided = [0], asyncio.Event()

    def arrive() -> None:  # an admission was decided (held or refused)
        arrived[0] += 1
        if arrived[0] == 12:
            everyone_decided.set()

    async def one() -> bool:
        context = Context()

        async def script() -> AsyncIterator[pb.ProcessingRequest]:
            for request in oai_request(body):
                yield request
            arrive()
            await everyone_decided.wait()  # every hold is in place before anyone settles
            reply = context.written[-1]
            mutation = reply.request_body.response.body_mutation.body
            allowed = orjson.loads(mutation or orjson.dumps(body))["max_completion_tokens"]
            usage = {"prompt_tokens": 10, "completion_tokens": allowed}  # generates it all
            yield response_headers(200, "application/json")
            yield response_body(orjson.dumps({"model": "gpt-5", "usage": usage}), eos=True)

        await servicer.Process(script(), context)
        refused = context.written[1].HasField("immediate_response")
        if refused:  # the server ended the RPC after its refusal
            arrive()
        await everyone_decided.wait()
        return not refused

    admitted = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(12))), 30)
    await servicer.gateway.settle_pending(10)
    assert 0 < sum(admitted) < 12
    assert await team_used(servicer) <= 5_000_000


async def test_request_cancelled_during_admission_leaves_no_hold() -> None:
    """The client hangs up while the admission is in the store: the hold it makes is
    settled when the stream closes, not left held until its TTL."""
    sink = ListSink()
    servicer = gateway(sink)
    store = servicer.gateway.store
    entered, release = asyncio.Event(), asyncio.Event()
    original = store.hold

    async def slow_hold(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)  # applied in the store ...
        entered.set()
        await release.wait()  # ... but its reply comes after the client hung up
        return result

    store.hold = slow_hold  # type: ignore[method-assign]
    task = asyncio.ensure_future(
        run(servicer, [request_headers("/v1/messages", extra=AUTH), request_body(STREAM_BODY)])
    )
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(servicer.gateway.settle_pending(5), 6)
    assert await team_used(servicer) == 0  # released (nothing was forwarded)
    (record,) = sink.records
    assert record["outcome"] == "client_abort"


# ---- pipeline budgets are bound to the caller ---------------------------------------------------

BOB = "gwk_bob_" + "b" * 40


def two_teams(sink: ListSink, rules: list[dict[str, Any]]) -> ExternalProcessor:
    from extproc.policies.auth import hash_key

    config = parse_config(
        {
            "providers": {
                "main": {
                    "api": "anthropic",
                    "base_url": "https://llm.internal",
                    "credential": {"value": "sk-held"},
                }
            },
            "auth": {
                "keys": [
                    {"id": "alice", "hash": hash_key(KEY), "team": "red"},
                    {"id": "bob", "hash": hash_key(BOB), "team": "blue"},
                ]
            },
            "budgets": {"rules": rules},
        }
    )
    return ExternalProcessor(Gateway.from_config(config, metrics=Metrics(), audit=sink))


def json_call(key: str, extra: dict[str, str], output_tokens: int) -> list[pb.ProcessingRequest]:
    body = orjson.dumps({"model": "claude-opus-4-8", "max_tokens": 100, "messages": []})
    usage = {"input_tokens": 10, "output_tokens": output_tokens}
    answer = orjson.dumps({"model": "claude-opus-4-8", "usage": usage, "content": []})
    return [
        request_headers("/v1/messages", extra={"x-api-key": key, **extra}),
        request_body(body),
        response_headers(200, "application/json"),
        response_body(answer, eos=True),
    ]


async def test_a_pipeline_header_cannot_charge_another_teams_pipeline() -> None:
    sink = ListSink()
    rules = [{"scope": "pipeline", "id": "blue/release-prod", "window": "lifetime", "tokens": 300}]
    servicer = two_teams(sink, rules)
    header = {"x-ci-pipeline-id": "release-prod"}
    for _ in range(5):  # alice (team red) names Bob's pipeline
        await run(servicer, json_call(KEY, header, output_tokens=100))
    assert {r["outcome"] for r in sink.records} == {"ok"}
    assert sink.records[0]["scopes"]["pipeline"] == "red/release-prod"
    ledger = servicer.gateway.spending.ledger
    (blue,) = await ledger.status([Scope("pipeline", "blue/release-prod")])
    assert blue.used == 0  # Bob's pipeline budget is untouched
    replies = await run(servicer, json_call(BOB, header, output_tokens=100))
    assert not replies[1].HasField("immediate_response")


async def test_a_new_pipeline_id_each_time_escapes_no_budget_of_the_caller() -> None:
    sink = ListSink()
    rules = [
        {"scope": "pipeline", "window": "lifetime", "tokens": 10_000},
        {"scope": "key", "window": "lifetime", "tokens": 1_000},
    ]
    servicer = two_teams(sink, rules)
    statuses = []
    for i in range(12):
        replies = await run(
            servicer, json_call(KEY, {"x-ci-pipeline-id": f"rand-{i}"}, output_tokens=100)
        )
        immediate = replies[1].immediate_response
        statuses.append(immediate.status.code if replies[1].HasField("immediate_response") else 200)
    assert statuses[0] == 200
    assert statuses[-1] == 429  # the key's own budget applies whatever the header says
    (key,) = await servicer.gateway.spending.ledger.status([Scope("key", "alice")])
    assert key.used <= 1_000


def test_anonymous_callers_get_no_pipeline_scope() -> None:
    from extproc.policies.auth import ANONYMOUS
    from extproc.policies.budget.spending import scopes_of

    assert scopes_of(ANONYMOUS, {"x-ci-pipeline-id": "p"}, "x-ci-pipeline-id") == []


# ---- anonymous callers on the gateway's credential are limited ---------------------------------


def anonymous_gateway(sink: ListSink, **limits: Any) -> ExternalProcessor:
    config = parse_config(
        {
            "providers": {
                "main": {
                    "api": "anthropic",
                    "base_url": "https://llm.internal",
                    "credential": {"value": "sk-held"},
                }
            },
            "auth": {"required": False},
            "rate_limits": {"key": {"requests_per_minute": 2}, **limits},
        }
    )
    return ExternalProcessor(Gateway.from_config(config, metrics=Metrics(), audit=sink))


async def anonymous_status(servicer: ExternalProcessor, headers: dict[str, str]) -> int:
    body = orjson.dumps({"model": "claude-opus-4-8", "max_tokens": 5, "messages": []})
    replies = await run(
        servicer, [request_headers("/v1/messages", extra=headers), request_body(body)]
    )
    reply = replies[1]
    return reply.immediate_response.status.code if reply.HasField("immediate_response") else 200


async def test_anonymous_callers_rotating_keys_are_limited_per_address() -> None:
    servicer = anonymous_gateway(ListSink())
    statuses = [
        await anonymous_status(
            servicer, {"x-api-key": f"rotated-{i}", "x-forwarded-for": "198.51.100.7"}
        )
        for i in range(3)
    ]
    assert statuses == [200, 200, 429]
    assert await anonymous_status(servicer, {"x-forwarded-for": "198.51.100.7"}) == 429
    assert await anonymous_status(servicer, {"x-forwarded-for": "203.0.113.9"}) == 200
    # A client's own x-forwarded-for entries come before the one Envoy appends: ignored.
    spoofed = {"x-forwarded-for": "192.0.2.1, 198.51.100.7"}
    assert await anonymous_status(servicer, spoofed) == 429


async def test_anonymous_callers_can_share_one_subject() -> None:
    servicer = anonymous_gateway(ListSink(), anonymous="shared")
    addresses = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
    statuses = [await anonymous_status(servicer, {"x-forwarded-for": a}) for a in addresses]
    assert statuses == [200, 200, 429]


async def test_trusted_hops_pick_the_address_before_the_load_balancer() -> None:
    servicer = anonymous_gateway(ListSink(), xff_trusted_hops=1)
    lb = "10.0.0.2"
    assert await anonymous_status(servicer, {"x-forwarded-for": f"198.51.100.1, {lb}"}) == 200
    assert await anonymous_status(servicer, {"x-forwarded-for": f"198.51.100.1, {lb}"}) == 200
    assert await anonymous_status(servicer, {"x-forwarded-for": f"198.51.100.1, {lb}"}) == 429
    assert await anonymous_status(servicer, {"x-forwarded-for": f"198.51.100.2, {lb}"}) == 200


# ---- count_tokens counts against the request limits and the daily quota ---------------------


async def test_count_tokens_counts_against_the_tier_quota() -> None:
    from extproc.policies.auth import hash_key

    sink = ListSink()
    config = parse_config(
        {
            "providers": {
                "main": {
                    "api": "anthropic",
                    "base_url": "https://llm.internal",
                    "credential": {"value": "sk-held"},
                }
            },
            "auth": {"keys": [{"id": "alice", "hash": hash_key(KEY), "tier": "tiny"}]},
            "tiers": {"tiny": {"requests_per_day": 3}},
        }
    )
    servicer = ExternalProcessor(Gateway.from_config(config, metrics=Metrics(), audit=sink))
    body = orjson.dumps({"model": "claude-opus-4-8", "messages": []})
    statuses = []
    for _ in range(4):
        replies = await run(
            servicer,
            [request_headers("/v1/messages/count_tokens", extra=AUTH), request_body(body)],
        )
        reply = replies[1]
        ok = not reply.HasField("immediate_response")
        statuses.append(200 if ok else reply.immediate_response.status.code)
    assert statuses == [200, 200, 200, 429]
    refused = [r for r in sink.records if r["outcome"].startswith("rejected")]
    assert refused[0]["outcome"] == "rejected_quota_exhausted"
    assert await anonymous_status(servicer, AUTH) == 429  # the quota is spent for messages too


def test_unlimited_anonymous_use_of_a_gateway_credential_is_detected() -> None:
    from extproc.policies.budget.spending import anonymous_unlimited

    provider = {"api": "anthropic", "base_url": "https://x", "credential": {"value": "s"}}
    open_config = parse_config({"providers": {"main": provider}})
    assert anonymous_unlimited(open_config)
    limited = parse_config(
        {"providers": {"main": provider}, "rate_limits": {"key": {"requests_per_minute": 5}}}
    )
    assert not anonymous_unlimited(limited)
    passthrough = parse_config({"providers": {"main": {**provider, "credential": None}}})
    assert not anonymous_unlimited(passthrough)


async def test_openai_stream_answered_with_a_json_error_passes_intact() -> None:
    body = {"model": "gpt-5", "stream": True, "max_completion_tokens": 10, "messages": []}
    error = orjson.dumps({"error": {"message": "bad", "type": "invalid_request_error"}})
    replies = await run(
        gateway(ListSink()),
        [
            *oai_request(body),
            response_headers(400, "application/json"),
            response_body(error, eos=True),
        ],
    )
    reply = replies[3].response_body.response
    assert not reply.HasField("body_mutation") or reply.body_mutation.body == error


async def test_admission_that_timed_out_after_holding_is_released_by_id() -> None:
    """The store applied the hold but its reply timed out (503 to the client): the hold is
    released by the request's spend id when the stream closes, not left until its TTL."""
    from extproc.store import StoreUnavailable

    sink = ListSink()
    servicer = gateway(sink)
    store = servicer.gateway.store
    original = store.hold

    async def late_hold(*args: Any, **kwargs: Any) -> Any:
        await original(*args, **kwargs)
        raise StoreUnavailable("timed out after applying")

    store.hold = late_hold  # type: ignore[method-assign]
    replies = await run(
        servicer, [request_headers("/v1/messages", extra=AUTH), request_body(STREAM_BODY)]
    )
    assert replies[1].immediate_response.status.code == 503
    assert await team_used(servicer) == 0


async def test_usage_chunk_is_dropped_after_answer_screening_too() -> None:
    sink = ListSink()
    servicer = gateway(sink, guard={})
    body = {"model": "gpt-5", "stream": True, "max_completion_tokens": 100, "messages": []}
    replies = await run(
        servicer,
        [
            *oai_request(body),
            response_headers(200, "text/event-stream"),
            response_body(CONTENT_CHUNK + USAGE_CHUNK + b"data: [DONE]\n\n", eos=True),
        ],
    )
    out = replies[3].response_body.response.body_mutation.body
    assert b'"usage"' not in out
    assert b"[DONE]" in out
    assert b'"hi"' in out
    (record,) = sink.records
    assert (record["input_tokens"], record["output_tokens"]) == (9, 4)


async def test_settle_the_store_missed_is_retried_when_it_is_back() -> None:
    from extproc.store import StoreUnavailable

    sink = ListSink()
    servicer = gateway(sink)
    store = servicer.gateway.store
    original = store.settle
    failures = [StoreUnavailable("down"), StoreUnavailable("still down")]

    async def flaky_settle(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return await original(*args, **kwargs)

    store.settle = flaky_settle  # type: ignore[method-assign]
    await run(
        servicer,
        [
            request_headers("/v1/messages", extra=AUTH),
            request_body(STREAM_BODY),
            response_headers(200, "text/event-stream"),
            response_body(anthropic_events("a b c d e", final=True), eos=True),
        ],
    )
    (record,) = sink.records
    expected = round(record["cost_usd"] * 1e6)
    for _ in range(50):  # retried after 0.25 s, then 0.5 s
        if await team_used(servicer) == expected:
            break
        await asyncio.sleep(0.1)
    assert await team_used(servicer) == expected  # the estimate's hold was replaced
