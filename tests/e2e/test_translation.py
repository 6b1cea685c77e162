"""Anthropic ⇄ OpenAI translation through the real Envoy (issue 13 items 1, 2, 3, 5).

The official SDKs talk to the gateway in their own shape; the route's provider speaks
the other one (the fake provider checks what the real one would): the `anthropic` SDK
served by an OpenAI-compatible backend, the `openai` SDK served by Claude, JSON and
streamed, with tools. The guard, the cache, budgets and the audit record work on the
caller's shape whichever vendor answered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import yaml

from extproc.policies.auth import hash_key, new_key
from tests.claude_cli import ROOT, claude_path, run_claude
from tests.data.claude_code_request import build_request
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

AWS_KEY = "AKIAZ7QXM4PLN3V2RT5K"  # shaped like an access key id; not a real one
TOOL_INPUT = {"command": "ls -la /tmp", "description": "list files"}
TOOLS: Any = [
    {
        "name": "Bash",
        "description": "Run a shell command",
        "input_schema": {
            "type": "object",
            "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
            "required": ["command"],
        },
    }
]
OPENAI_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": t["name"],
            "description": t["description"],
            "parameters": t["input_schema"],
        },
    }
    for t in TOOLS
]
ASK: Any = [{"role": "user", "content": "list the files"}]
DEV_KEY = new_key("dev")
FREE_KEY = new_key("free-dev")


@pytest.fixture(scope="module")
def crossed(fake: FakeProvider) -> Iterator[Stack]:
    """Claude models on the Anthropic provider, qwen on the OpenAI-compatible one; gpt-4
    names mapped to Claude; thinking refused, everything else dropped with a note."""
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-ant-held"}
    config["providers"]["openai"]["credential"] = {"value": "sk-oai-held"}
    config["models"] = {
        "routes": [
            {"match": "qwen*", "provider": "openai"},
            {"match": "claude-*", "provider": "anthropic"},
        ]
    }
    config["profiles"] = {
        "default": {
            "map": {"gpt-4": "claude-sonnet-4-6", "gpt-4o-mini": "claude-haiku-4-5"},
            "cache": {"enabled": True},
            "translation": {"refuse": ["thinking"], "cache_prefix": True},
        }
    }
    config["guard"] = {"hash_key": {"value": "test-hash-key"}}
    config["auth"] = {
        "keys": [
            {"id": "dev", "hash": hash_key(DEV_KEY)},
            {"id": "free-dev", "hash": hash_key(FREE_KEY), "tier": "free"},
        ]
    }
    config["tiers"] = {"free": {"map": {"claude-*": "qwen3-32b"}, "requests_per_day": 100}}
    config["budgets"] = {"rules": [{"scope": "key", "id": "dev", "window": "daily", "usd": 50}]}
    # A self-hosted model has no published price; this test prices it like a small one.
    qwen = {"input": 0.1, "output": 0.3, "cache_write": 0.1, "cache_read": 0.01}
    config["pricing"] = {"models": {"qwen3-32b": qwen}}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="caller-key", base_url=stack.url, max_retries=0)


def _gpt(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key="caller-key", base_url=f"{stack.url}/v1", max_retries=0)


def _tool_headers(**extra: str) -> dict[str, str]:
    return {
        "x-fake-tool-input": orjson.dumps(TOOL_INPUT).decode(),
        "x-fake-piece-chars": "4",
        **extra,
    }


# --- item 1: an Anthropic client on an OpenAI-compatible provider --------------------------


def test_anthropic_sdk_on_openai_provider_json_with_tools(
    crossed: Stack, received: FakeProvider
) -> None:
    raw = _claude(crossed).messages.with_raw_response.create(
        model="qwen3-32b",
        max_tokens=200,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "auto"},
        extra_headers=_tool_headers(**{"x-fake-tool-calls": "2", "cache-control": "no-store"}),
    )
    message = raw.parse()
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["tool_use", "tool_use"]
    assert [b.input for b in message.content] == [TOOL_INPUT, TOOL_INPUT]  # type: ignore[union-attr]
    (sent,) = received.received
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-oai-held"
    assert "x-api-key" not in sent.headers
    assert "anthropic-version" not in sent.headers  # the caller's vendor headers stay here
    body = sent.json()
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["tools"][0]["function"]["name"] == "Bash"
    assert body["tool_choice"] == "auto"
    record = record_for(crossed, raw.headers["x-gateway-request-id"])
    assert record["provider"] == "openai"
    assert record["translation"] == {"provider_api": "openai", "dropped": {"cache_control": 1}}
    assert record["input_tokens"] == message.usage.input_tokens > 0
    assert record["output_tokens"] == message.usage.output_tokens > 0


def test_anthropic_sdk_streams_tool_arguments_from_openai_provider(
    crossed: Stack, received: FakeProvider
) -> None:
    events: list[str] = []
    with _claude(crossed).messages.stream(
        model="qwen3-32b",
        max_tokens=200,
        messages=[{"role": "user", "content": "list the files, streamed"}],
        tools=TOOLS,
        extra_headers=_tool_headers(**{"x-fake-tool-calls": "2"}),
    ) as stream:
        for event in stream:
            events.append(event.type)
        message = stream.get_final_message()
    assert [b.input for b in message.content] == [TOOL_INPUT, TOOL_INPUT]  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert events.count("input_json") > 4  # the arguments arrived in pieces
    assert message.usage.output_tokens > 0
    assert received.received[0].json()["stream_options"] == {"include_usage": True}


def test_anthropic_sdk_tool_result_turn_and_text_stream(
    crossed: Stack, received: FakeProvider
) -> None:
    turns: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": TOOL_INPUT}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt b.txt"}
            ],
        },
    ]
    with _claude(crossed).messages.stream(
        model="qwen3-32b",
        max_tokens=100,
        messages=turns,
        tools=TOOLS,
        extra_headers=_tool_headers(**{"x-fake-tool-once": "1", "x-fake-echo": "1"}),
    ) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == "tool said: a.txt b.txt"
    assert message.stop_reason == "end_turn"
    sent = received.received[0].json()["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "toolu_1"
    assert sent[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "a.txt b.txt"}


def test_openai_provider_error_reaches_the_anthropic_sdk_in_its_shape(
    crossed: Stack, received: FakeProvider
) -> None:
    with pytest.raises(anthropic.RateLimitError) as error:
        _claude(crossed).messages.create(
            model="qwen3-32b", max_tokens=10, messages=ASK, extra_headers={"x-fake-status": "429"}
        )
    assert error.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_untranslatable_field_is_refused_per_route(crossed: Stack, received: FakeProvider) -> None:
    turns: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "text", "text": "ok"},
            ],
        },
        {"role": "user", "content": "go on"},
    ]
    response = httpx.post(
        f"{crossed.url}/v1/messages",
        json={"model": "qwen3-32b", "max_tokens": 10, "messages": turns},
        headers={"anthropic-version": "2023-06-01", "x-api-key": "caller-key"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "messages[1].content[0]" in response.json()["error"]["message"]
    assert "thinking" in response.json()["error"]["message"]
    assert response.headers["x-gateway-error"] == "untranslatable"
    assert response.headers["x-should-retry"] == "false"
    assert received.received == []
    record = record_for(crossed, response.headers["x-gateway-request-id"])
    assert (record["status"], record["outcome"]) == (400, "rejected_untranslatable")


def test_count_tokens_for_an_openai_provider_is_estimated_by_the_gateway(
    crossed: Stack, received: FakeProvider
) -> None:
    counted = _claude(crossed).messages.count_tokens(model="qwen3-32b", messages=ASK)
    assert counted.input_tokens > 0
    assert received.received == []


def test_translated_stream_is_screened_and_cached_in_the_callers_shape(
    crossed: Stack, received: FakeProvider
) -> None:
    headers = {"x-fake-text": f"Use the key {AWS_KEY} to deploy", "x-fake-piece-chars": "3"}
    body = {
        "model": "qwen3-32b",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "deploy key?"}],
    }
    answers = []
    for _ in range(2):
        response = httpx.post(
            f"{crossed.url}/v1/messages",
            json=body,
            headers={"anthropic-version": "2023-06-01", "x-api-key": "caller-key", **headers},
            timeout=30,
        )
        assert response.status_code == 200
        assert AWS_KEY not in response.text
        assert "[REDACTED:aws_access_key:" in response.text
        assert "event: message_stop" in response.text
        answers.append(response)
    assert len(received.received) == 1  # the second came from the cache
    assert answers[1].headers["x-gateway-cache"] == "hit"
    first = record_for(crossed, answers[0].headers["x-gateway-request-id"])
    assert first["guard"]["output"][0]["rule"] == "aws_access_key"


# --- item 2: an OpenAI client on an Anthropic provider -------------------------------------


def test_openai_sdk_on_anthropic_provider_json_with_tools_and_mapping(
    crossed: Stack, received: FakeProvider
) -> None:
    raw = _gpt(crossed).chat.completions.with_raw_response.create(
        model="gpt-4",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "list the files"},
        ],
        tools=OPENAI_TOOLS,
        tool_choice="required",
        extra_headers=_tool_headers(),
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls: Any = choice.message.tool_calls
    assert orjson.loads(calls[0].function.arguments) == TOOL_INPUT
    assert calls[0].function.name == "Bash"
    (sent,) = received.received
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-held"
    assert sent.headers["anthropic-version"] == "2023-06-01"  # Anthropic requires it
    body = sent.json()
    assert body["model"] == "claude-sonnet-4-6"  # gpt-4 -> claude-sonnet-4-6 (profile map)
    assert body["max_tokens"] == 4096  # the caller set none: the route's default_max_tokens
    assert body["tool_choice"] == {"type": "any"}
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}  # cache_prefix
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    record = record_for(crossed, raw.headers["x-gateway-request-id"])
    assert (record["requested_model"], record["provider"]) == ("gpt-4", "anthropic")
    assert record["translation"]["provider_api"] == "anthropic"
    assert completion.usage is not None
    assert (
        record["input_tokens"] + record["cache_creation_input_tokens"]
        == completion.usage.prompt_tokens
    )


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_sdk_streams_from_anthropic_provider(
    crossed: Stack, received: FakeProvider, include_usage: bool
) -> None:
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    chunks = _gpt(crossed).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"stream please {include_usage}"}],
        stream=True,
        stream_options=options,
        extra_headers={"x-fake-text": "One two three four."},
    )
    text, usage, finish = "", None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == "One two three four."
    assert finish == "stop"
    assert (usage is not None) is include_usage
    assert received.received[0].json()["model"] == "claude-haiku-4-5"


def test_openai_sdk_streams_tool_arguments_from_anthropic_provider(
    crossed: Stack, received: FakeProvider
) -> None:
    chunks = _gpt(crossed).chat.completions.create(
        model="gpt-4",
        messages=[{"role": "user", "content": "list files (stream)"}],
        tools=OPENAI_TOOLS,
        stream=True,
        extra_headers=_tool_headers(),
    )
    pieces = [
        call.function.arguments or ""
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
        if call.function is not None
    ]
    assert len(pieces) > 4
    assert orjson.loads("".join(pieces)) == TOOL_INPUT


def test_anthropic_provider_error_reaches_the_openai_sdk_in_its_shape(
    crossed: Stack, received: FakeProvider
) -> None:
    with pytest.raises(openai.InternalServerError) as error:
        _gpt(crossed).chat.completions.create(
            model="gpt-4", messages=ASK, extra_headers={"x-fake-status": "529"}
        )
    assert error.value.status_code == 529
    assert error.value.code == "overloaded_error"


# --- item 1: the Claude Code CLI on an OpenAI-compatible backend ---------------------------


@pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")
def test_claude_code_completes_a_tool_using_turn_on_an_openai_backend(
    tmp_path: Path, crossed: Stack, received: FakeProvider
) -> None:
    tool = {"command": "echo translated-$((40+2))", "description": "Print a word"}
    headers = "\n".join(
        [
            f"x-fake-tool-input: {orjson.dumps(tool).decode()}",
            "x-fake-tool-once: 1",
            "x-fake-echo: 1",
            "x-fake-tool-name: Bash",
            "x-fake-piece-chars: 5",
        ]
    )
    work = tmp_path / "work"
    work.mkdir()
    result = run_claude(
        tmp_path,
        *("-p", "run the echo", "--model", "qwen3-32b", "--allowedTools", "Bash(echo:*)"),
        cwd=work,
        ANTHROPIC_BASE_URL=crossed.url,
        ANTHROPIC_API_KEY="caller-key",
        ANTHROPIC_CUSTOM_HEADERS=headers,
        ANTHROPIC_SMALL_FAST_MODEL="qwen3-32b",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said: translated-42" in result.stdout  # the CLI ran the tool and sent its result
    chats = [r.json() for r in received.received if r.path == "/v1/chat/completions"]
    assert len(chats) >= 2
    last = chats[-1]
    assert last["messages"][-1]["role"] == "tool"
    assert "translated-42" in last["messages"][-1]["content"]
    assert len(last["tools"]) > 5  # Claude Code's tool set, as OpenAI functions
    assert all(t["type"] == "function" for t in last["tools"])
    assert [r for r in received.received if r.path == "/v1/messages"] == []
    session = next(
        r.headers["x-claude-code-session-id"]
        for r in received.received
        if r.path == "/v1/chat/completions"
    )
    dropped = [
        r["translation"]["dropped"]
        for r in crossed.audit_records()
        if r.get("session_id") == session and "translation" in r
    ]
    assert dropped
    # what Claude Code sends that vLLM cannot take is dropped and counted, not refused
    assert {"cache_control", "reasoning", "beta"} <= set(dropped[-1])


# --- the two-vendor example, /v1/models in the caller's shape (item 3) ---------------------

CI_KEY = new_key("ci")


@pytest.fixture(scope="module")
def two_vendor(fake: FakeProvider) -> Iterator[Stack]:
    """examples/two-vendor.yaml with both providers pointed at the fake."""
    config = yaml.safe_load((ROOT / "examples" / "two-vendor.yaml").read_text())
    config.update({k: v for k, v in gateway_config(fake.url).items() if k != "providers"})
    config["envoy"]["bootstrap"] = str(ROOT / "envoy" / "two-personality.yaml")
    config["providers"]["anthropic"].update(base_url=fake.url, credential={"value": "sk-agent"})
    config["providers"]["advisor"].update(base_url=fake.url, credential={"value": "sk-vllm"})
    config["auth"]["keys"][0]["hash"] = hash_key(CI_KEY)
    config["auth"]["keys"][0]["map"] = {"gpt-4": "claude-opus-4-8"}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _personality(stack: Stack, name: str) -> anthropic.Anthropic:
    headers = {"x-claude-personality": name}
    return anthropic.Anthropic(
        api_key=CI_KEY, base_url=stack.url, max_retries=0, default_headers=headers
    )


def test_two_vendor_example_agent_on_anthropic_advisor_on_openai(
    two_vendor: Stack, received: FakeProvider
) -> None:
    agent = _personality(two_vendor, "agent").messages.create(
        model="claude-opus-4-8", max_tokens=20, messages=[{"role": "user", "content": "write it"}]
    )
    advisor = _personality(two_vendor, "advisor").messages.create(
        model="claude-sonnet-4-6",
        max_tokens=20,
        messages=[{"role": "user", "content": "review it"}],
    )
    assert agent.content[0].text == advisor.content[0].text == "Hello from the fake provider."  # type: ignore[union-attr]
    assert advisor.model == "qwen3-32b"
    (to_anthropic, to_vllm) = received.received
    assert (to_anthropic.path, to_anthropic.headers["x-api-key"]) == ("/v1/messages", "sk-agent")
    assert (to_vllm.path, to_vllm.headers["authorization"]) == (
        "/v1/chat/completions",
        "Bearer sk-vllm",
    )
    assert to_vllm.json()["model"] == "qwen3-32b"
    pdf: Any = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
    }
    pdf_turn: Any = [pdf]
    with pytest.raises(anthropic.BadRequestError, match="documents"):
        _personality(two_vendor, "advisor").messages.create(
            model="claude-sonnet-4-6",
            max_tokens=20,
            messages=[{"role": "user", "content": pdf_turn}],
        )


def test_models_list_in_the_callers_shape_from_the_other_vendor(
    two_vendor: Stack, received: FakeProvider
) -> None:
    listed = httpx.get(
        f"{two_vendor.url}/v1/models",
        headers={
            "x-api-key": CI_KEY,
            "anthropic-version": "2023-06-01",
            "x-claude-personality": "advisor",
        },
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    body = listed.json()
    (sent,) = received.received
    assert sent.path == "/v1/models"
    assert sent.headers["authorization"] == "Bearer sk-vllm"
    assert body["data"][0]["type"] == "model"  # Anthropic's list shape, paged by the gateway
    assert {"has_more", "first_id", "last_id"} <= body.keys()
    ids = [m["id"] for m in body["data"]]
    assert "gpt-5" in ids  # from the OpenAI-shaped provider's own list
    assert "gpt-4" in ids  # a name the key's map serves (the route then pins qwen3-32b)
    assert "anthropic-version" not in sent.headers
    one = httpx.get(
        f"{two_vendor.url}/v1/models/gpt-5",
        headers={
            "x-api-key": CI_KEY,
            "anthropic-version": "2023-06-01",
            "x-claude-personality": "advisor",
        },
        timeout=30,
    )
    assert one.status_code == 200, one.text
    assert one.json() == {
        "type": "model",
        "id": "gpt-5",
        "display_name": "gpt-5",
        "created_at": "2025-01-01T00:00:00Z",
    }


def test_models_list_adds_the_names_a_mapping_serves(
    crossed: Stack, received: FakeProvider
) -> None:
    listed = _gpt(crossed).models.list()
    ids = [m.id for m in listed.data]
    assert {"gpt-4", "gpt-4o-mini"} <= set(ids)  # profiles.default.map: gpt-4 -> claude-sonnet-4-6
    assert "gpt-5" in ids


# --- item 5: budgets and the audit the same whatever the backend ---------------------------


def test_budgets_charge_translated_calls_at_the_served_models_price(
    crossed: Stack, received: FakeProvider
) -> None:
    gpt = openai.OpenAI(api_key=DEV_KEY, base_url=f"{crossed.url}/v1", max_retries=0)
    raw = gpt.chat.completions.with_raw_response.create(
        model="gpt-4", messages=[{"role": "user", "content": "budgeted, via Claude"}]
    )
    claude = anthropic.Anthropic(api_key=DEV_KEY, base_url=crossed.url, max_retries=0)
    streamed = claude.messages.with_raw_response.create(
        model="qwen3-32b",
        max_tokens=30,
        stream=True,
        messages=[{"role": "user", "content": "budgeted, via qwen"}],
    )
    for _ in streamed.parse():
        pass
    via_claude = record_for(crossed, raw.headers["x-gateway-request-id"])
    via_qwen = record_for(crossed, streamed.headers["x-gateway-request-id"])
    assert [
        r.headers.get("x-api-key") or r.headers.get("authorization") for r in received.received
    ] == [
        "sk-ant-held",
        "Bearer sk-oai-held",
    ]  # the gateway key never leaves
    for record, model in ((via_claude, "claude-sonnet-4-6"), (via_qwen, "qwen3-32b")):
        assert record["scopes"]["key"] == "dev"
        assert record["served_model"] == model
        assert record["cost_usd"] > 0
        assert record["output_tokens"] > 0
    quota = httpx.get(f"{crossed.url}/v1/gateway/quota", headers={"x-api-key": DEV_KEY}, timeout=10)
    (budget,) = quota.json()["budgets"]
    assert budget["limit"] - budget["remaining"] == pytest.approx(
        via_claude["cost_usd"] + via_qwen["cost_usd"], rel=1e-3
    )


@pytest.mark.parametrize("model", ["qwen3-32b", "claude-opus-4-8"])
def test_a_provider_stream_cut_short_stays_cut_after_translation(
    crossed: Stack, received: FakeProvider, model: str
) -> None:
    """Translated (qwen) or not (claude), a stream the provider cuts is never completed
    by the gateway: no message_stop reaches the client, the audit says so, nothing is
    cached. (How much of it the client sees depends on Envoy's timing of the reset.)"""
    body = {
        "model": model,
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": f"cut me short {model}"}],
    }
    session = f"cut-{model}"  # finds the audit record whatever Envoy answered
    headers = {
        "anthropic-version": "2023-06-01",
        "x-api-key": "caller-key",
        "x-claude-code-session-id": session,
    }
    words = " ".join(f"word{i}" for i in range(80))
    cut = {"x-fake-abort-after": "50", "x-fake-text": words}
    with httpx.stream(
        "POST", f"{crossed.url}/v1/messages", json=body, headers={**headers, **cut}, timeout=30
    ) as response:
        pieces: list[bytes] = []
        with contextlib.suppress(httpx.RemoteProtocolError):  # Envoy passes the reset on
            pieces.extend(response.iter_raw())
    assert "message_stop" not in b"".join(pieces).decode()
    assert received.received[-1].json()["model"] == model
    deadline = time.monotonic() + 5
    records: list[dict[str, Any]] = []
    while not records:
        assert time.monotonic() < deadline, "no audit record for the cut stream"
        records = [r for r in crossed.audit_records() if r.get("session_id") == session]
        time.sleep(0.05)
    # truncated / provider_reset, or client_abort when Envoy's reset of the downstream
    # reaches the gateway first (timing): never "ok"
    assert records[-1]["outcome"] in ("truncated", "provider_reset", "client_abort")
    assert records[-1].get("cache_stored") is not True


def test_recorded_claude_code_request_reaches_an_openai_backend(
    crossed: Stack, received: FakeProvider
) -> None:
    body = build_request()
    body["model"] = "qwen3-32b"
    response = httpx.post(
        f"{crossed.url}/v1/messages",
        json=body,
        headers={
            "anthropic-version": "2023-06-01",
            "x-api-key": "caller-key",
            "cache-control": "no-store",
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    sent = received.received[-1].json()
    assert len(sent["tools"]) == 24
    assert sent["messages"][0]["role"] == "system"
    assert any(m["role"] == "tool" for m in sent["messages"])
    assert "cache_control" not in received.received[-1].body.decode()
    record = record_for(crossed, response.headers["x-gateway-request-id"])
    assert record["translation"]["dropped"]["cache_control"] >= 1


def test_free_tier_maps_claude_to_an_internal_model_on_another_vendor(
    crossed: Stack, received: FakeProvider
) -> None:
    claude = anthropic.Anthropic(api_key=FREE_KEY, base_url=crossed.url, max_retries=0)
    raw = claude.messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=20, messages=[{"role": "user", "content": "free"}]
    )
    assert raw.parse().model == "qwen3-32b"
    (sent,) = received.received
    assert (sent.path, sent.json()["model"]) == ("/v1/chat/completions", "qwen3-32b")
    record = record_for(crossed, raw.headers["x-gateway-request-id"])
    assert (record["requested_model"], record["served_model"]) == ("claude-sonnet-4-6", "qwen3-32b")
    assert (record["tier"], record["provider"]) == ("free", "openai")
