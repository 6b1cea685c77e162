"""Claude Code on day one (issue 12): the CLI itself, and what it sends, through real Envoy.

The CLI retries a 401 and every 5xx ten times with backoff unless the answer carries
`x-should-retry: false`; these tests run it against the gateway the way a new user would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from extproc import supervisor
from extproc.policies.auth import hash_key, new_key
from tests.claude_cli import claude_env, claude_path
from tests.e2e.test_data_path import record_for
from tests.fake_provider import Compressor, FakeProvider
from tests.harness import Stack, gateway_config
from tests.redis_server import RedisServer

KEY = new_key("dev")
PROVIDER_SECRET = "sk-ant-held"
MESSAGES: Any = [{"role": "user", "content": "hi"}]
HEADERS = {"anthropic-version": "2023-06-01"}

needs_cli = pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")


@pytest.fixture(scope="module")
def keyed(fake: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["auth"] = {"required": True, "keys": [{"id": "dev", "hash": hash_key(KEY)}]}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def run_claude(
    tmp_path: Path, stack: Stack, *, cwd: Path | None = None, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`claude -p hi` through the stack; the result and how long it took."""
    cli = claude_path()
    assert cli is not None
    environment = claude_env(tmp_path, ANTHROPIC_BASE_URL=stack.url, **env)
    started = time.monotonic()
    result = subprocess.run(
        [cli, "-p", "hi", "--model", "claude-sonnet-4-6"],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, time.monotonic() - started


# -- item 3: refusals say whether a retry can help ------------------------------------------


@needs_cli
def test_cli_with_a_wrong_key_fails_fast(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, elapsed = run_claude(tmp_path, keyed, ANTHROPIC_API_KEY="gwk_dev_mistyped")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < 5, f"the CLI took {elapsed:.1f}s: it retried a refusal"
    assert "invalid gateway key" in output
    assert received.received == []


@needs_cli
def test_cli_with_the_right_key_answers(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, _ = run_claude(tmp_path, keyed, ANTHROPIC_API_KEY=KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the fake provider." in result.stdout
    (call,) = [r for r in received.received if r.path == "/v1/messages"][-1:]
    session = call.headers["x-claude-code-session-id"]
    records = [r for r in keyed.audit_records() if r["session_id"] == session]
    assert records
    assert all(r["key_id"] == "dev" for r in records)


@needs_cli
def test_cli_with_both_variables_set_to_the_same_key_answers(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, _ = run_claude(tmp_path, keyed, ANTHROPIC_API_KEY=KEY, ANTHROPIC_AUTH_TOKEN=KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    (request,) = [r for r in received.received if r.path == "/v1/messages"][-1:]
    assert request.headers["x-api-key"] == PROVIDER_SECRET
    assert "authorization" not in request.headers


@needs_cli
def test_cli_with_two_different_keys_is_told_which_variables(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, elapsed = run_claude(
        tmp_path, keyed, ANTHROPIC_API_KEY=KEY, ANTHROPIC_AUTH_TOKEN="gwk_dev_other"
    )
    assert result.returncode != 0
    assert elapsed < 5
    assert received.received == []
    headers = {**HEADERS, "x-api-key": KEY, "authorization": "Bearer gwk_dev_other"}
    body = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": MESSAGES}
    response = httpx.post(f"{keyed.url}/v1/messages", json=body, headers=headers, timeout=10)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "ANTHROPIC_API_KEY" in message
    assert "ANTHROPIC_AUTH_TOKEN" in message
    assert response.headers["x-should-retry"] == "false"


# -- items 1 and 2: the gateway only ever sees plain bytes ----------------------------------

GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
CLAUDE_ACCEPT = "gzip, deflate, br, zstd"


@pytest.fixture(scope="module")
def policed(fake: FakeProvider) -> Iterator[Stack]:
    """Every answer-side policy on: guard, cache, spend accounting."""
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["providers"]["openai"]["credential"] = {"value": "sk-oai-held"}
    config["guard"] = {}
    config["profiles"] = {"default": {"cache": {"enabled": True}}}
    config["limits"] = {"max_body_bytes": 1024 * 1024}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _ask(api: str, text: str, *, stream: bool) -> tuple[str, dict[str, Any]]:
    if api == "openai":
        body: dict[str, Any] = {"model": "gpt-5", "messages": [{"role": "user", "content": text}]}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return "/v1/chat/completions", body
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": text}],
    }
    return "/v1/messages", body | ({"stream": True} if stream else {})


def _post_raw(stack: Stack, path: str, content: bytes, **headers: str) -> httpx.Response:
    base = {**HEADERS, "content-type": "application/json", "x-api-key": "client-key"}
    if path.startswith("/v1/chat"):
        base = {"content-type": "application/json", "authorization": "Bearer client-key"}
    with httpx.Client(timeout=20) as client:
        request = client.build_request(
            "POST", stack.url + path, content=content, headers={**base, **headers}
        )
        response = client.send(request, stream=True)
        response.read()
        return response


@pytest.mark.parametrize("coding", ["allowed", "gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_compressed_answers_pass_every_answer_policy(
    policed: Stack, received: FakeProvider, api: str, stream: bool, coding: str
) -> None:
    path, body = _ask(api, f"token please ({api} {stream} {coding})", stream=stream)
    answer = f"Here it is: {GITHUB_TOKEN} keep it safe"
    headers = {"accept-encoding": CLAUDE_ACCEPT, "x-fake-compress": coding, "x-fake-text": answer}
    first = _post_raw(policed, path, orjson.dumps(body), **headers)
    assert first.status_code == 200, first.text
    assert "content-encoding" not in first.headers  # decoded for the client too
    assert GITHUB_TOKEN not in first.text
    assert "[REDACTED:" in first.text
    assert "safe" in first.text
    assert received.received[-1].headers["accept-encoding"] == "identity"
    record = record_for(policed, first.headers["x-gateway-request-id"])
    assert record["outcome"] == "ok"
    assert record["input_tokens"] > 0
    assert record["output_tokens"] > 0
    assert record["cost_usd"] > 0
    assert record["cache_stored"] is True
    again = _post_raw(policed, path, orjson.dumps(body), **headers)
    assert again.headers["x-gateway-cache"] == "hit"
    assert GITHUB_TOKEN not in again.text


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, br"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_the_gateway_cannot_read_is_withheld(
    policed: Stack, received: FakeProvider, stream: bool, coding: str
) -> None:
    path, body = _ask("anthropic", f"token please ({stream} {coding})", stream=stream)
    headers = {"x-fake-compress": coding.split(",")[-1].strip(), "x-fake-text": GITHUB_TOKEN}
    response = _post_raw(policed, path, orjson.dumps(body), **headers)
    assert response.status_code == 502
    assert "content-encoding" not in response.headers
    assert response.json()["error"]["type"] == "api_error"
    assert "'br'" in response.text or "'zstd'" in response.text
    assert response.headers["x-gateway-error"] == "undecodable_answer"
    assert response.headers["x-should-retry"] == "false"
    record = record_for(policed, response.headers["x-gateway-request-id"])
    assert record["error_type"] == "undecodable_answer"


def _compress(coding: str, data: bytes) -> bytes:
    compressor = Compressor(coding)
    return compressor.piece(data) + compressor.finish()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_request_bodies_are_decoded_before_policy(
    policed: Stack, received: FakeProvider, coding: str
) -> None:
    path, body = _ask("anthropic", f"my token is {GITHUB_TOKEN} ({coding})", stream=False)
    content = _compress(coding, orjson.dumps(body))
    response = _post_raw(policed, path, content, **{"content-encoding": coding})
    assert response.status_code == 200, response.text
    (request,) = received.received
    assert "content-encoding" not in request.headers
    sent = request.json()
    assert GITHUB_TOKEN not in request.body.decode()
    assert sent["model"] == "claude-sonnet-4-6"
    record = record_for(policed, response.headers["x-gateway-request-id"])
    assert record["guard"]["input"]


def test_a_plain_body_labelled_gzip_is_a_clear_400(policed: Stack, received: FakeProvider) -> None:
    path, body = _ask("anthropic", "labelled", stream=False)
    response = _post_raw(policed, path, orjson.dumps(body), **{"content-encoding": "gzip"})
    assert response.status_code == 400
    assert "not valid gzip" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false"
    assert received.received == []


def test_an_unknown_request_encoding_is_415_naming_it(
    policed: Stack, received: FakeProvider
) -> None:
    path, body = _ask("anthropic", "lzw", stream=False)
    response = _post_raw(policed, path, orjson.dumps(body), **{"content-encoding": "compress"})
    assert response.status_code == 415
    assert "'compress'" in response.json()["error"]["message"]
    assert response.headers["x-gateway-error"] == "unsupported_encoding"
    assert response.headers["x-should-retry"] == "false"
    assert received.received == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd", "br"])
def test_a_compression_bomb_is_refused_never_held(
    policed: Stack, received: FakeProvider, coding: str
) -> None:
    bomb = _compress(coding, b'{"model": "' + b"a" * (64 * 1024 * 1024) + b'"}')
    assert len(bomb) < 1024 * 1024
    response = _post_raw(policed, "/v1/messages", bomb, **{"content-encoding": coding})
    if coding in ("gzip", "deflate"):  # decoded by the gateway, in bounded steps
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "request_too_large"
    else:  # Envoy's decompressor stops at its inflate-ratio guard: the body is cut short
        assert response.status_code in (400, 413)
    assert response.headers["x-should-retry"] == "false"
    assert received.received == []


# -- item 5: probes and the endpoints the platform docs name ---------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/", "/health", "/health?deep=1"])
def test_probes_answer_without_a_provider_or_a_key(
    keyed: Stack, received: FakeProvider, method: str, path: str
) -> None:
    response = httpx.request(method, keyed.url + path, timeout=10)
    assert response.status_code == 200
    if method == "GET":
        assert response.json()["status"] == "ok"
        assert ("store" in response.json()) == ("deep" in path)
    else:
        assert response.content == b""
    assert received.received == []


def test_quota_at_the_short_path_is_the_gateway_quota(keyed: Stack, received: FakeProvider) -> None:
    headers = {"x-api-key": KEY}
    short = httpx.get(keyed.url + "/quota", headers=headers, timeout=10)
    long = httpx.get(keyed.url + "/v1/gateway/quota", headers=headers, timeout=10)
    assert short.status_code == long.status_code == 200
    assert short.json() == long.json()
    refused = httpx.get(keyed.url + "/quota", timeout=10)
    assert refused.status_code == 401
    assert refused.headers["x-should-retry"] == "false"
    assert received.received == []


def _models(stack: Stack, query: str, key: str = KEY) -> httpx.Response:
    headers = {**HEADERS, "x-api-key": key, "anthropic-beta": "oauth-2025-04-20"}
    return httpx.get(f"{stack.url}/v1/models{query}", headers=headers, timeout=10)


def test_model_discovery_lists_in_the_anthropic_shape(keyed: Stack, received: FakeProvider) -> None:
    response = _models(keyed, "?limit=1000")
    assert response.status_code == 200
    listing = response.json()
    ids = [m["id"] for m in listing["data"]]
    assert ids == list(received.models)
    assert all(m["type"] == "model" and m["display_name"] for m in listing["data"])
    assert (listing["first_id"], listing["last_id"], listing["has_more"]) == (
        ids[0],
        ids[-1],
        False,
    )
    (request,) = received.received
    assert request.query == "limit=1000"


def test_model_listing_pages_with_the_api_cursors(keyed: Stack, received: FakeProvider) -> None:
    every = [m["id"] for m in _models(keyed, "?limit=1000").json()["data"]]
    first = _models(keyed, "?limit=2").json()
    assert [m["id"] for m in first["data"]] == every[:2]
    assert first["has_more"] is True
    second = _models(keyed, f"?limit=2&after_id={first['last_id']}").json()
    assert [m["id"] for m in second["data"]] == every[2:4]
    back = _models(keyed, f"?limit=2&before_id={second['first_id']}").json()
    assert back["data"] == first["data"]
    assert _models(keyed, "?limit=2000").status_code == 400
    assert _models(keyed, "?limit=0").headers["x-should-retry"] == "false"


# -- item 6: prices that match the invoice ---------------------------------------------------

PRICED_USAGE = [
    # Sonnet 4.6: 5-minute and 1-hour cache writes apart, 3 web searches.
    (
        "anthropic",
        "claude-sonnet-4-6",
        {
            "input_tokens": 1000,
            "output_tokens": 100,
            "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 0,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 1000,
                "ephemeral_1h_input_tokens": 2000,
            },
            "server_tool_use": {"web_search_requests": 3},
        },
        # 1000 x 3 + 100 x 15 + 1000 x 3.75 + 2000 x 6 micro-USD + 3 x $0.01
        0.05025,
    ),
    # Sonnet 4.5 past 200K: the whole call at $6 / $22.50.
    (
        "anthropic",
        "claude-sonnet-4-5",
        {"input_tokens": 798_265, "output_tokens": 1000, "cache_creation_input_tokens": 0},
        4.81209,
    ),
    # OpenAI: 8,000 of 10,000 prompt tokens cached; 2,500 reasoning tokens inside 3,000.
    (
        "openai",
        "gpt-5",
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 3_000,
            "total_tokens": 13_000,
            "prompt_tokens_details": {"cached_tokens": 8_000},
            "completion_tokens_details": {"reasoning_tokens": 2_500},
        },
        0.0335,
    ),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("api", "model", "usage", "usd"), PRICED_USAGE)
def test_the_audit_record_prices_usage_as_the_invoice(
    policed: Stack,
    received: FakeProvider,
    api: str,
    model: str,
    usage: dict[str, Any],
    usd: float,
    stream: bool,
) -> None:
    path, body = _ask(api, f"price me {model} {stream}", stream=stream)
    body["model"] = model
    headers = {"x-fake-usage": orjson.dumps(usage).decode(), "cache-control": "no-store"}
    response = _post_raw(policed, path, orjson.dumps(body), **headers)
    assert response.status_code == 200, response.text
    record = record_for(policed, response.headers["x-gateway-request-id"])
    assert record["cost_usd"] == pytest.approx(usd, abs=1e-6)


# -- item 4: Claude Code's own headers in the record ----------------------------------------


def test_subagent_headers_are_recorded_bounded_and_counted(
    policed: Stack, received: FakeProvider
) -> None:
    path, body = _ask("anthropic", "subagent at work", stream=False)
    headers = {
        "x-claude-code-session-id": "session-1",
        "x-claude-code-agent-id": "agent-" + "a" * 5000,
        "x-claude-code-parent-agent-id": "parent-7",
    }
    response = _post_raw(policed, path, orjson.dumps(body), **headers)
    assert response.status_code == 200
    record = record_for(policed, response.headers["x-gateway-request-id"])
    assert record["session_id"] == "session-1"
    assert record["parent_agent_id"] == "parent-7"
    assert record["agent_id"] == ("agent-" + "a" * 5000)[:128]
    metrics = policed.metrics_text(wait_for="extproc_subagent_requests_total")
    assert 'extproc_subagent_requests_total{endpoint="messages"}' in metrics
    assert "agent-aaa" not in metrics  # no per-id label


# -- item 8: Claude Code's own text is not a finding -----------------------------------------


@pytest.fixture(scope="module")
def strict(fake: FakeProvider) -> Iterator[Stack]:
    """IP addresses and PII redacted, so a false positive would show."""
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    deny = [{"id": "no_rm_rf", "phrase": "rm -rf /", "action": "block"}]
    profile = {"actions": {"ipv4": "redact", "pii": "redact"}, "output": {"deny": deny}}
    config["guard"] = {"profiles": {"default": profile}}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


@needs_cli
def test_cli_billing_block_passes_the_guard_untouched(
    tmp_path: Path, strict: Stack, received: FakeProvider
) -> None:
    result, _ = run_claude(tmp_path, strict, ANTHROPIC_API_KEY="client-key")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [r for r in received.received if r.path == "/v1/messages"]
    assert calls
    for call in calls:
        first = call.json()["system"][0]["text"]
        assert first.startswith("x-anthropic-billing-header:")
        assert "cc_version=" in first
        assert "REDACTED" not in first
    records = [r for r in strict.audit_records() if r["endpoint"] == "messages"]
    findings = [v["rule"] for r in records for v in r.get("guard", {}).get("input", [])]
    assert "ipv4" not in findings


def test_first_system_block_is_forwarded_as_sent_whatever_the_guard_does(
    strict: Stack, received: FakeProvider
) -> None:
    billing = {
        "type": "text",
        "text": "x-anthropic-billing-header: cc_version=2.1.197.123; cc_entrypoint=cli; "
        "owner=ana@example.org host=8.8.8.8",
    }
    system = [
        billing,
        {"type": "text", "text": "mail ops@acmecorp.io; app v10.0.19041.1; ip 8.8.4.4"},
    ]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 20, "system": system, "messages": MESSAGES}
    response = _post_raw(strict, "/v1/messages", orjson.dumps(body))
    assert response.status_code == 200, response.text
    (call,) = received.received
    sent = call.json()["system"]
    assert sent[0] == billing
    assert "ops@acmecorp.io" not in sent[1]["text"]
    assert "8.8.4.4" not in sent[1]["text"]
    assert "v10.0.19041.1" in sent[1]["text"]


def test_a_withheld_answer_says_not_to_retry(strict: Stack, received: FakeProvider) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 20, "messages": MESSAGES}
    response = _post_raw(
        strict, "/v1/messages", orjson.dumps(body), **{"x-fake-text": "run rm -rf / now"}
    )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"  # not overloaded: not transient
    assert response.headers["x-gateway-error"] == "output_blocked"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-gateway-request-id"]


# -- item 9: `extproc up` with a port in use; oversized headers ------------------------------


@pytest.mark.parametrize("api", ["anthropic", "openai"])
@pytest.mark.parametrize("shape", ["bytes", "count"])
def test_oversized_headers_get_431_in_the_callers_shape(
    policed: Stack, received: FakeProvider, api: str, shape: str
) -> None:
    path, body = _ask(api, "big headers", stream=False)
    many = {f"x-h{i}": "v" for i in range(200)}
    extra = {"x-big": "a" * 200_000} if shape == "bytes" else many
    response = _post_raw(policed, path, orjson.dumps(body), **extra)
    assert response.status_code == 431
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "headers" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert received.received == []


@needs_cli
def test_cli_with_oversized_custom_headers_fails_fast(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    big = "x-team-notes: " + "n" * 100_000
    result, elapsed = run_claude(
        tmp_path, keyed, ANTHROPIC_API_KEY=KEY, ANTHROPIC_CUSTOM_HEADERS=big
    )
    assert result.returncode != 0
    assert elapsed < 5, f"the CLI took {elapsed:.1f}s"
    assert received.received == []


def _up(stack: Stack) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "extproc", "up", "--config", str(stack.config_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_up_names_the_key_of_a_port_in_use(fake: FakeProvider, tmp_path: Path) -> None:
    stack = Stack(gateway_config(fake.url), workdir=tmp_path)
    with socket.socket() as holder:
        holder.bind((stack.config.listen.host, stack.config.listen.port))
        holder.listen()
        started = time.monotonic()
        result = _up(stack)
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert f"{stack.config.listen} (listen) is already in use" in result.stderr
    assert "`listen`" in result.stderr
    assert "gateway ready" not in result.stderr


def test_up_does_not_mistake_another_envoy_for_its_own(fake: FakeProvider, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "mine").mkdir()
    other = Stack(gateway_config(fake.url), workdir=tmp_path / "other")
    other.start_envoy()  # an Envoy already answering on the admin port
    try:
        data = gateway_config(fake.url)
        data["envoy"] = {"admin": str(other.config.envoy.admin)}
        mine = Stack(data, workdir=tmp_path / "mine")
        result = _up(mine)
        assert result.returncode == 1
        assert "(envoy.admin) is already in use" in result.stderr
        assert "gateway ready" not in result.stderr
        # And the readiness check itself asks for the Envoy it started, by node id.
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            admin = other.config.envoy.admin
            assert supervisor.wait_envoy_ready(admin, 2, sleeper) is True
            assert supervisor.wait_envoy_ready(admin, 2, sleeper, "extproc-up-not-it") is False
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        other.close()


# -- item 7: a fresh HOME per CI job explains (and can be normalised out of) a cache miss ----


@pytest.fixture(scope="module")
def normalized(fake: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["profiles"] = {
        "default": {"cache": {"enabled": True, "normalize": [{"builtin": "paths"}]}}
    }
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _ci_job(stack: Stack) -> list[dict[str, Any]]:
    """One `claude -p` run with a fresh HOME and working directory, as a CI job has;
    the audit records of its model calls."""
    home = Path(tempfile.mkdtemp(prefix="ci-home-", dir="/tmp"))
    try:
        before = len(stack.audit_records())
        result, _ = run_claude(home, stack, cwd=home, ANTHROPIC_API_KEY="client-key")
        assert result.returncode == 0, result.stdout + result.stderr
        records = stack.audit_records()[before:]
        return [r for r in records if r["endpoint"] == "messages"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


@needs_cli
def test_a_fresh_home_per_ci_job_is_named_in_the_hint(
    policed: Stack, received: FakeProvider
) -> None:
    _ci_job(policed)
    second = _ci_job(policed)
    explained = [r for r in second if r.get("cache_volatile_directories")]
    assert explained, [r.get("cache_volatile_paths") for r in second]
    fields = {p for r in explained for p in r["cache_volatile_directories"]}
    assert fields <= {p for r in explained for p in r["cache_volatile_paths"]}
    assert any(p.startswith("system") for p in fields)


@needs_cli
def test_the_paths_rule_turns_those_misses_into_hits(
    normalized: Stack, received: FakeProvider
) -> None:
    _ci_job(normalized)
    second = _ci_job(normalized)
    assert "hit" in [r["cache"] for r in second]


def test_the_hint_header_offers_the_paths_rule(policed: Stack, received: FakeProvider) -> None:
    def ask(home: str) -> httpx.Response:
        path, body = _ask("anthropic", f"list {home}/project/src please", stream=False)
        return _post_raw(policed, path, orjson.dumps(body))

    ask("/home/runner-qwerty")
    hinted = ask("/home/runner-zxcvbn")
    assert hinted.headers["x-gateway-cache"] == "miss"
    hint = hinted.headers["x-gateway-cache-hint"]
    assert "messages[0].content" in hint
    assert "{builtin: paths}" in hint


@needs_cli
def test_cli_reads_a_compressed_answer_screened(
    tmp_path: Path, policed: Stack, received: FakeProvider
) -> None:
    custom = f"x-fake-compress: gzip\nx-fake-text: the token is {GITHUB_TOKEN} ok"
    result, _ = run_claude(
        tmp_path, policed, ANTHROPIC_API_KEY="client-key", ANTHROPIC_CUSTOM_HEADERS=custom
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert GITHUB_TOKEN not in result.stdout
    assert "[REDACTED:" in result.stdout
    calls = [r for r in received.received if r.path == "/v1/messages"]
    assert calls
    assert all(r.headers["accept-encoding"] == "identity" for r in calls)


@needs_cli
def test_cli_model_discovery_lists_through_the_gateway(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, _ = run_claude(
        tmp_path, keyed, ANTHROPIC_API_KEY=KEY, CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY="1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    listed = [r for r in received.received if r.path == "/v1/models"]
    if not listed:
        pytest.skip("this CLI version does not ask for the model list in -p mode")
    assert all(r.query == "limit=1000" for r in listed)


def test_deep_health_reports_a_store_that_does_not_answer(fake: FakeProvider) -> None:
    with RedisServer() as redis:
        stack = Stack(gateway_config(fake.url, store=redis.url))
        stack.start()
        try:
            assert httpx.get(f"{stack.url}/health?deep=1", timeout=10).json()["store"] == "ok"
            redis.kill()
            deep = httpx.get(f"{stack.url}/health?deep=1", timeout=10)
            assert deep.status_code == 503
            assert deep.json() == {"status": "degraded", "store": "unreachable"}
            assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200
        finally:
            stack.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_mislabelled_answer_is_withheld_not_passed_on(
    policed: Stack, received: FakeProvider, stream: bool
) -> None:
    path, body = _ask("anthropic", f"mislabelled {stream}", stream=stream)
    headers = {"x-fake-compress": "mislabelled", "x-fake-text": f"it is {GITHUB_TOKEN}"}
    response = _post_raw(policed, path, orjson.dumps(body), **headers)
    assert GITHUB_TOKEN not in response.text
    assert "content-encoding" not in response.headers
    assert "not valid gzip" in response.text
    if stream:
        assert "event: error" in response.text
    else:
        assert response.status_code == 502
        assert response.headers["x-gateway-error"] == "undecodable_answer"
    record = record_for(policed, response.headers["x-gateway-request-id"])
    assert record["error_type"] == "undecodable_answer"
