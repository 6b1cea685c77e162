"""Fallback across providers through the real Envoy (extproc/fallback.py).

The chain: `primary` (tests/flaky_provider.py, a process the tests can kill) then
`backup` (a FakeProvider) serving another model at another price. A request the
primary fails with 529, 429 or 500 (or cannot take at all) is answered by the backup
before any byte reached the client; the audit record lists both attempts, the budget
is settled at the backup's price, and the fallback is counted by route and reason.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from extproc import supervisor
from extproc.apis.usage import Usage
from extproc.policies.pricing import PriceTable, PricingConfig, cost_micros
from tests.claude_cli import claude_path, run_claude
from tests.fake_provider import FakeProvider, run_in_thread
from tests.harness import Stack, free_port, gateway_config

pytestmark = pytest.mark.e2e

PRIMARY_SECRET = "sk-primary-held-by-gateway"
BACKUP_SECRET = "sk-backup-held-by-gateway"
BACKUP_MODEL = "claude-haiku-4-5"
ASKED = "claude-sonnet-4-6"


class Primary:
    """The flaky first provider as a process on a fixed free port (restartable)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.flaky_provider", "--port", str(self.port)]
        self.process = supervisor.spawn(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("the flaky provider did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def backup() -> Iterator[FakeProvider]:
    with run_in_thread() as provider:
        yield provider


@pytest.fixture(scope="module")
def primary() -> Iterator[Primary]:
    server = Primary()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def stack(primary: Primary, backup: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(backup.url)
    config["providers"] = {
        "primary": {
            "api": "anthropic",
            "base_url": f"http://127.0.0.1:{primary.port}",
            "credential": {"value": PRIMARY_SECRET},
            "connect_timeout_seconds": 1,
        },
        "backup": {
            "api": "anthropic",
            "base_url": backup.url,
            "credential": {"value": BACKUP_SECRET},
        },
    }
    chain = [{"provider": "primary"}, {"provider": "backup", "model": BACKUP_MODEL}]
    config["profiles"] = {"default": {"fallback": chain}}
    # Each attempt's first-byte timeout: a hung provider is given up on after 1 s.
    config["limits"] = {"first_byte_timeout_seconds": 1}
    gateway = Stack(config)
    gateway.start()
    yield gateway
    gateway.close()


def _client(stack: Stack, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="client-key", base_url=stack.url, max_retries=0, default_headers=headers
    )


def _record(stack: Stack, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in stack.audit_records():
            if record.get("request_id") == request_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def _price(model: str, usage: Usage) -> float:
    price = PriceTable.from_config(PricingConfig()).find(model)
    assert price is not None
    return float(Decimal(cost_micros(usage, price)) / 1_000_000)


@pytest.mark.parametrize(
    ("status", "reason"), [(529, "overloaded"), (429, "rate_limited"), (500, "server_error")]
)
def test_failed_first_provider_is_answered_by_the_next(
    stack: Stack, backup: FakeProvider, status: int, reason: str
) -> None:
    backup.clear()
    client = _client(stack, **{"x-flaky-status": str(status)})
    raw = client.messages.with_raw_response.create(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    message = raw.parse()
    assert message.model == BACKUP_MODEL
    assert "x-gateway-attempts" not in raw.headers
    (seen,) = backup.received
    assert seen.headers["x-api-key"] == BACKUP_SECRET  # the attempt's own credential
    assert "x-gateway-client-api" not in seen.headers
    assert seen.json()["model"] == BACKUP_MODEL
    record = _record(stack, raw.headers["x-gateway-request-id"])
    assert record["provider"] == "backup"
    assert record["served_model"] == BACKUP_MODEL
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", status),
        ("backup", 200),
    ]
    assert all(a["latency_ms"] >= 0 for a in record["attempts"])
    usage = Usage(
        input_tokens=message.usage.input_tokens, output_tokens=message.usage.output_tokens
    )
    assert record["cost_usd"] == pytest.approx(_price(BACKUP_MODEL, usage))
    metrics = stack.metrics_text(wait_for="extproc_fallbacks_total")
    assert f'provider="primary",reason="{reason}"' in metrics


def test_a_healthy_first_provider_answers_alone(stack: Stack, backup: FakeProvider) -> None:
    backup.clear()
    raw = _client(stack).messages.with_raw_response.create(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.parse().model == ASKED
    assert backup.received == []
    record = _record(stack, raw.headers["x-gateway-request-id"])
    assert record["provider"] == "primary"
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [("primary", 200)]
    assert record["cost_usd"] == pytest.approx(
        _price(ASKED, Usage(input_tokens=10, output_tokens=5))
    )


def test_a_hung_first_provider_is_given_up_after_the_first_byte_timeout(stack: Stack) -> None:
    client = _client(stack, **{"x-flaky-stall-ms": "5000"})
    started = time.monotonic()
    raw = client.messages.with_raw_response.create(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.parse().model == BACKUP_MODEL
    assert time.monotonic() - started < 4
    record = _record(stack, raw.headers["x-gateway-request-id"])
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", 0),
        ("backup", 200),
    ]
    assert record["attempts"][0]["latency_ms"] >= 900


def test_when_every_provider_fails_the_client_gets_the_last_answer(
    stack: Stack, backup: FakeProvider
) -> None:
    client = _client(stack, **{"x-flaky-status": "529", "x-fake-status": "503"})
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(
            model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hello"}]
        )
    assert caught.value.status_code == 503
    record = _record(stack, caught.value.response.headers["x-gateway-request-id"])
    assert record["outcome"] == "provider_error"
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", 529),
        ("backup", 503),
    ]
    assert record["cost_usd"] == 0


def test_streamed_fallback_happens_before_the_first_byte(stack: Stack) -> None:
    client = _client(stack, **{"x-flaky-status": "529"})
    with client.messages.stream(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-gateway-request-id"]
    assert text == "Hello from the fake provider."
    assert final.model == BACKUP_MODEL
    record = _record(stack, request_id)
    assert record["streamed"] is True
    assert [a["status"] for a in record["attempts"]] == [529, 200]


def test_a_stream_that_breaks_mid_way_is_never_retried_elsewhere(
    stack: Stack, backup: FakeProvider
) -> None:
    """Once the answer's headers and first event reached the client, the answer is the
    first provider's: its failure ends the stream, no second provider is mixed in."""
    backup.clear()
    client = _client(stack, **{"x-flaky-break": "1"})
    with client.messages.stream(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        request_id = stream.response.headers["x-gateway-request-id"]
        with pytest.raises(Exception, match=r"incomplete|peer closed"):
            stream.get_final_message()
    assert backup.received == []
    record = _record(stack, request_id)
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [("primary", 200)]
    assert record["outcome"] in ("provider_reset", "truncated", "client_abort")


def test_a_caller_of_the_other_api_shape_is_served_through_the_chain(
    stack: Stack, backup: FakeProvider
) -> None:
    """The OpenAI SDK on this all-Anthropic chain: each attempt translates its body into a
    Messages request; the backup's answer comes back as a chat completion."""
    backup.clear()
    client = openai.OpenAI(
        api_key="client-key",
        base_url=f"{stack.url}/v1",
        max_retries=0,
        default_headers={"x-flaky-status": "529"},
    )
    raw = client.chat.completions.with_raw_response.create(
        model=ASKED, max_tokens=32, messages=[{"role": "user", "content": "x"}]
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from the fake provider."
    (call,) = [r for r in backup.received if r.path.startswith("/v1/messages")]
    assert call.json()["model"] == BACKUP_MODEL
    assert call.headers["anthropic-version"]
    record = _record(stack, raw.headers["x-gateway-request-id"])
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", 529),
        ("backup", 200),
    ]


def test_an_openai_stream_is_translated_from_the_next_provider(
    stack: Stack, backup: FakeProvider
) -> None:
    client = openai.OpenAI(
        api_key="client-key",
        base_url=f"{stack.url}/v1",
        max_retries=0,
        default_headers={"x-flaky-status": "500"},
    )
    chunks = list(
        client.chat.completions.create(
            model=ASKED,
            max_tokens=32,
            stream=True,
            messages=[{"role": "user", "content": "x"}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake provider."
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


@pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")
def test_claude_code_is_answered_by_the_next_provider(
    tmp_path: Path, stack: Stack, backup: FakeProvider
) -> None:
    """Claude Code itself would retry a 529 ten times; through the chain it never sees one."""
    backup.clear()
    result = run_claude(
        tmp_path,
        *("-p", "hi", "--model", ASKED),
        ANTHROPIC_BASE_URL=stack.url,
        ANTHROPIC_API_KEY="client-key",
        ANTHROPIC_CUSTOM_HEADERS="x-flaky-status: 529",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the fake provider." in result.stdout
    calls = [r for r in backup.received if r.path.startswith("/v1/messages")]
    assert calls
    assert all(c.json()["model"] == BACKUP_MODEL for c in calls)
    session = calls[-1].headers["x-claude-code-session-id"]
    records = [r for r in stack.audit_records() if r["session_id"] == session]
    assert records
    # After 5 consecutive 5xx outlier detection ejects the primary: later calls skip it (0).
    answered = [
        [(a["provider"], a["status"]) for a in r["attempts"]]
        for r in records
        if r["endpoint"] == "messages"
    ]
    assert answered
    assert all(
        a in ([("primary", 529), ("backup", 200)], [("primary", 0), ("backup", 200)])
        for a in answered
    )


# Last in this module: the killed provider stays ejected by outlier detection for a while.
def test_killing_the_first_provider_under_load_fails_no_request(
    stack: Stack, primary: Primary
) -> None:
    """200 requests at concurrency 8; the first provider is SIGKILLed a quarter of the way."""
    client = _client(stack)
    done: list[str] = []

    def call(i: int) -> str:
        if i == 50:
            primary.kill()
        message = client.messages.create(
            model=ASKED, max_tokens=16, messages=[{"role": "user", "content": f"load {i}"}]
        )
        return message.model

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            done = list(pool.map(call, range(200)))
        # With the first provider gone, a request's record shows it was not answered there.
        raw = client.messages.with_raw_response.create(
            model=ASKED, max_tokens=16, messages=[{"role": "user", "content": "after"}]
        )
        record = _record(stack, raw.headers["x-gateway-request-id"])
    finally:
        if primary.process is None:
            primary.start()
    assert len(done) == 200  # an exception would have left pool.map
    assert done.count(BACKUP_MODEL) >= 100
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", 0),  # connection refused, or skipped: outlier detection ejected it
        ("backup", 200),
    ]
    metrics = stack.metrics_text(wait_for='reason="unavailable"')
    assert 'provider="primary",reason="unavailable"' in metrics
