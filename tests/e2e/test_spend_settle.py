"""Spend and settlement through real Envoy and a real redis-server (issue 11, items 7-8).

A provider that hangs before its first byte is cut by Envoy's per-try timeout and answered
in the caller's shape, with the reservation released; clients that hang up within
milliseconds of sending leave every stream audited and no reservation held; Envoy's
access log names every request, so audit and access log reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis import Redis

from extproc.policies.auth import hash_key, new_key
from extproc.store import ManualClock
from extproc.telemetry.reconcile import cause, read_json_lines, reconcile
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.redis_server import RedisServer

KEY = new_key("settler")
MODEL = "claude-sonnet-4-6"
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": KEY}


def _config(fake: FakeProvider, redis_url: str, workdir: Path) -> dict[str, Any]:
    config = gateway_config(fake.url, store=redis_url)
    config["envoy"]["access_log"] = str(workdir / "access.log")
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["providers"]["openai"]["credential"] = {"value": "sk-oai"}
    config["auth"] = {"required": True, "keys": [{"id": "settler", "hash": hash_key(KEY)}]}
    config["budgets"] = {"rules": [{"scope": "key", "window": "daily", "usd": 50}]}
    config["limits"] = {"first_byte_timeout_seconds": 1}
    return config


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    fake: FakeProvider, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("settle")
    gateway = Stack(_config(fake, redis.url, workdir), workdir=workdir)
    gateway.start()
    yield gateway
    gateway.close()


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def _held(redis: RedisServer) -> int:
    """Live reservation holds across every budget counter."""
    client = Redis.from_url(redis.url)
    try:
        return sum(int(client.zcard(k)) for k in client.scan_iter("*:holds"))
    finally:
        client.close()


def _used_usd(stack: Stack) -> float:
    quota = httpx.get(f"{stack.url}/v1/gateway/quota", headers=HEADERS, timeout=10).json()
    return float(quota["budgets"][0]["used"])


@pytest.mark.parametrize("stream", [False, True])
def test_provider_silent_before_first_byte_gets_504_in_callers_shape(
    stack: Stack, redis: RedisServer, stream: bool
) -> None:
    before = _used_usd(stack)
    started = time.monotonic()
    response = httpx.post(
        f"{stack.url}/v1/messages",
        json=_body(stream=stream),
        headers={**HEADERS, "x-fake-stall-ms": "5000"},
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert 0.9 < elapsed < 4
    assert response.headers["x-gateway-error"] == "upstream_timeout"
    assert response.json()["error"]["type"] == "timeout_error"
    request_id = response.headers["x-gateway-request-id"]
    record = record_for(stack, request_id)
    assert record["outcome"] == "rejected_upstream_timeout"
    assert _held(redis) == 0
    assert _used_usd(stack) == before  # released, nothing charged


def test_openai_caller_gets_the_timeout_in_openai_shape(stack: Stack) -> None:
    body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}", "x-fake-stall-ms": "5000"},
        timeout=30,
    )
    assert response.status_code == 504
    assert response.headers["x-gateway-error"] == "upstream_timeout"
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_slow_stream_after_first_byte_is_not_cut(stack: Stack) -> None:
    """The first-byte timeout ends at the response headers: a stream whose events take
    longer than it in all still completes."""
    headers = {**HEADERS, "x-fake-delay-ms": "300", "x-fake-text": "one two three four five"}
    with httpx.stream(
        "POST", f"{stack.url}/v1/messages", json=_body(stream=True), headers=headers, timeout=30
    ) as response:
        text = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert b"message_stop" in text


def _hang_up(url: str, body: bytes, delay: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/messages?beta=hangup HTTP/1.1\r\nhost: {host}\r\n"
        "content-type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\nx-api-key: {KEY}\r\nx-fake-delay-ms: 200\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        time.sleep(delay)
    # closed: the client is gone


async def _hang_up_all(url: str, count: int) -> None:
    body = json.dumps(_body(stream=True)).encode()
    delays = [0.0005 + (i % 16) * 0.0005 for i in range(count)]  # 0.5-8 ms after sending
    await asyncio.gather(*(asyncio.to_thread(_hang_up, url, body, d) for d in delays))


def _access_log(stack: Stack, path: str) -> list[dict[str, Any]]:
    lines = Path(stack.data["envoy"]["access_log"]).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{") and path in line]


def test_clients_hanging_up_leave_every_stream_audited_and_nothing_held(
    stack: Stack, redis: RedisServer
) -> None:
    count = 50
    before = _settled_streams(stack)  # earlier tests' streams closed: not counted as ours
    seen = len(stack.audit_records())
    logged = len(_access_log(stack, "hangup"))
    asyncio.run(_hang_up_all(stack.url, count))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # Envoy logs a request when its stream ends
        entries = _access_log(stack, "hangup")[logged:]
        if len(entries) >= count and _held(redis) == 0:
            break
        time.sleep(0.1)
    assert len(entries) == count
    ids = {e["request_id"] for e in entries}
    opened = _streams(stack)["request_headers"] - before
    records = _audited(stack, seen, ids, opened)
    # Every stream whose first message ext_proc read was audited ...
    audited = sum(1 for e in entries if e["request_id"] in records)
    outcomes = {r["outcome"] for r in records.values()}
    assert audited == opened, (audited, opened, outcomes)
    assert outcomes <= {"client_abort", "ok"}, outcomes
    # ... and the rest (cancelled before the server read anything) are in Envoy's log, which
    # `extproc reconcile` turns into records: together, one for every request.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "reconcile",
            stack.data["envoy"]["access_log"],
            str(stack.audit_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    added = [json.loads(line) for line in result.stdout.splitlines()]
    missing = {r["request_id"] for r in added if r["reconciled"] == "missing"}
    assert ids == set(records) | missing
    assert {r["outcome"] for r in added if r["request_id"] in missing} <= {"client_abort"}
    assert _held(redis) == 0  # no reservation waits for its TTL


def _audited(stack: Stack, seen: int, ids: set[str], opened: int) -> dict[str, dict[str, Any]]:
    """The audit records of `ids`, once `opened` of them are written (a closed stream's
    record follows its settlement, which a loaded machine may delay), or after 20 s."""
    deadline = time.monotonic() + 20
    while True:
        new = stack.audit_records()[seen:]
        records = {r["request_id"]: r for r in new if r["request_id"] in ids}
        if len(records) >= opened or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _settled_streams(stack: Stack) -> int:
    """The server's count of streams it read, once it has stopped moving (a stream of an
    earlier test may still be closing on a loaded machine); bounded to 10 s."""
    deadline = time.monotonic() + 10
    last = _streams(stack)["request_headers"]
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _streams(stack)["request_headers"]
        if now == last:
            return now
        last = now
    return last


def _streams(stack: Stack) -> dict[str, int]:
    counts = {"none": 0, "request_headers": 0}
    for line in stack.metrics_text().splitlines():
        if line.startswith("extproc_streams_total{"):
            phase = line.split('"')[1]
            counts[phase] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def test_anonymous_callers_on_the_gateway_credential_are_rate_limited(fake: FakeProvider) -> None:
    """auth.required false with a gateway-held credential: rotating x-api-key or sending
    a made-up x-forwarded-for does not escape the per-address limit (Envoy appends the
    connection's address)."""
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["rate_limits"] = {"key": {"requests_per_minute": 2}}
    stack = Stack(config)
    try:
        stack.start()
        statuses = []
        for i in range(4):
            headers = {
                "anthropic-version": "2023-06-01",
                "x-api-key": f"rotated-{i}",
                "x-forwarded-for": f"192.0.2.{i}",
            }
            response = httpx.post(
                f"{stack.url}/v1/messages", json=_body(), headers=headers, timeout=30
            )
            statuses.append(response.status_code)
    finally:
        stack.close()
    assert statuses == [200, 200, 429, 429]
    assert response.headers["x-gateway-limit"] == "key.requests_per_minute"


# ---- billing what was streamed, through Envoy ------------------------------------------------


def test_client_gone_mid_stream_pays_for_what_it_read(stack: Stack) -> None:
    words = [f"token{i:04d}" for i in range(200)]
    headers = {
        **HEADERS,
        "x-fake-text": " ".join(words),
        "x-fake-delay-ms": "5",
    }
    seen_words = 0
    with httpx.stream(
        "POST", f"{stack.url}/v1/messages", json=_body(stream=True), headers=headers, timeout=30
    ) as response:
        request_id = response.headers["x-gateway-request-id"]
        for line in response.iter_lines():
            seen_words += line.count('"text_delta"')
            if seen_words >= 190:  # 95 % of the answer, then the client is gone
                break
    record = record_for(stack, request_id)
    assert record["outcome"] == "client_abort"
    assert record["usage_estimated"] is True
    assert record["output_tokens"] >= seen_words  # the fake bills one token a word
    assert record["cost_usd"] >= record["output_tokens"] * 15 / 1e6  # $15 / M output
    assert _flags(stack, request_id) == "DC"  # Envoy's access log agrees


def _flags(stack: Stack, request_id: str) -> str | None:
    """Envoy's response flags for a request (it flushes its access log every second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in read_json_lines(Path(stack.data["envoy"]["access_log"])):
            if entry.get("request_id") == request_id:
                return str(entry.get("flags"))
        time.sleep(0.2)
    return None


def test_provider_reset_mid_stream_is_told_apart_from_a_client_abort(stack: Stack) -> None:
    headers = {
        **HEADERS,
        "x-fake-abort-after": "6",
        "x-fake-delay-ms": "100",  # the client has the headers and some events first
        "x-fake-text": "alpha beta gamma delta epsilon zeta eta theta",
    }
    with httpx.stream(
        "POST", f"{stack.url}/v1/messages", json=_body(stream=True), headers=headers, timeout=30
    ) as response:
        request_id = response.headers["x-gateway-request-id"]
        with pytest.raises(httpx.HTTPError):
            for _ in response.iter_bytes():
                pass
    record = record_for(stack, request_id)
    # Envoy ends the gRPC stream alike whoever cut the request (extproc.stream
    # `_cut_short_outcome`): the server says client_abort, Envoy's flags say who it was.
    assert record["outcome"] == "client_abort"
    assert record["output_tokens"] >= 2  # the deltas that went through
    assert cause(_flags(stack, request_id)) == "provider_reset"  # Envoy's access log says
    access = read_json_lines(Path(stack.data["envoy"]["access_log"]))
    corrected = [
        r for r in reconcile(access, stack.audit_records()) if r["request_id"] == request_id
    ]
    assert [r["outcome"] for r in corrected] == ["provider_reset"]


def test_openai_stream_without_include_usage_is_billed_and_client_sees_no_usage(
    stack: Stack, received: FakeProvider
) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=f"{stack.url}/v1", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="gpt-5",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-fake-text": "one two three"},
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    sent = received.received[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_completion_tokens"] == 64_000  # the reserved cap, made explicit
    record = record_for(stack, chunks[0].id and stack.audit_records()[-1]["request_id"])
    assert record["output_tokens"] == 3
    assert record["cost_usd"] > 0


def test_output_limit_above_the_cap_is_rewritten(stack: Stack, received: FakeProvider) -> None:
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={
            "model": "gpt-5",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 128_000,
        },
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert received.received[-1].json()["max_completion_tokens"] == 64_000


def test_a_killed_replicas_streams_are_reconciled_and_charged(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """SIGKILL one ext_proc with streams open: the dead replica writes no audit record, so
    Envoy's access log names them; their holds expire into spend at their estimate
    instead of vanishing."""
    with RedisServer() as redis:
        config = _config(fake, redis.url, tmp_path)
        config["budgets"]["reservation_ttl_seconds"] = 1
        stack = Stack(config, workdir=tmp_path)
        try:
            stack.start()
            headers = {**HEADERS, "x-fake-delay-ms": "200", "x-fake-text": "a b c d e f"}
            client = httpx.Client(base_url=stack.url, timeout=30)
            ids, responses = [], []
            for _ in range(3):
                request = client.build_request(
                    "POST", "/v1/messages", json=_body(stream=True), headers=headers
                )
                response = client.send(request, stream=True)
                ids.append(response.headers["x-gateway-request-id"])
                chunks = response.iter_bytes()
                next(chunks)  # streaming, its budget held
                responses.append((response, chunks))
            stack.stop_process("extproc", signal.SIGKILL)
            for response, chunks in responses:
                with contextlib.suppress(httpx.HTTPError):
                    for _ in chunks:  # cut by Envoy, or ended unscreened (fail open)
                        pass
                response.close()
            client.close()
            deadline = time.monotonic() + 10
            missing: set[str] = set()
            while time.monotonic() < deadline and not set(ids) <= missing:
                access = read_json_lines(Path(config["envoy"]["access_log"]))
                added = reconcile(access, stack.audit_records())
                missing = {r["request_id"] for r in added if r["reconciled"] == "missing"}
                time.sleep(0.2)
            assert set(ids) <= missing  # every stream the dead replica held is on record
            # Read as a gateway whose clock is past the reservation TTL (the store decides
            # expiry by the caller's time), instead of sleeping until it is.
            used = asyncio.run(_key_usage(redis.url, config, ManualClock(time.time() + 1.2)))
            assert used > 0  # what the provider generated for them was not forgotten
        finally:
            stack.close()


async def _key_usage(url: str, config: dict[str, Any], clock: ManualClock) -> int:
    from extproc.policies.budget import Amount, BudgetConfig, BudgetLedger, Scope
    from extproc.store.redis import RedisStore

    store = RedisStore.from_url(url, clock=clock)
    try:
        ledger = BudgetLedger(BudgetConfig.model_validate(config["budgets"]), store)
        checks = ledger.checks_for([Scope("key", "settler")])
        await ledger.reserve("probe", checks, Amount(1))  # purges the expired holds
        (status,) = await ledger.status([Scope("key", "settler")])
        return status.used - 1
    finally:
        await store.close()
