"""Dialects, framings, upstream adapters and credential providers (issue 10 items 3-4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from extproc import stream as stream_module
from extproc.apis.dialect import ANTHROPIC, OPENAI, AnthropicMessages, ModelIn, dialect_of
from extproc.apis.framing import SSE, framing_for
from extproc.apis.sse import SseEvent
from extproc.config import parse_config
from extproc.decisions import Continue
from extproc.gateway import Gateway
from extproc.store.memory import MemoryStore
from extproc.stream import RequestStream
from extproc.telemetry.metrics import Metrics
from extproc.upstream import IDENTITY, UpstreamRequest, adapter_for, translator_for


def test_each_schema_has_one_dialect() -> None:
    assert dialect_of("anthropic") is ANTHROPIC
    assert dialect_of("openai") is OPENAI
    assert ANTHROPIC.model_in is ModelIn.BODY
    assert dialect_of("bedrock").name == "bedrock"  # the cloud client dialects
    assert dialect_of("vertex").name == "vertex"
    with pytest.raises(KeyError):
        dialect_of("gopher")


def test_the_dialect_names_the_model_and_caps_output() -> None:
    body: dict[str, Any] = {"model": "a", "max_tokens": 99_999}
    assert ANTHROPIC.with_model("/v1/messages", body, "b") == "/v1/messages"
    assert body["model"] == "b"
    assert ANTHROPIC.cap_output(body, 100)
    assert body["max_tokens"] == 100
    open_ended: dict[str, Any] = {"model": "gpt-5"}
    assert not ANTHROPIC.cap_output(dict(open_ended), 100)  # the provider refuses it
    assert OPENAI.cap_output(open_ended, 100)
    assert open_ended["max_completion_tokens"] == 100


def test_the_dialect_ends_a_stream_with_its_error_event() -> None:
    body = b'{"type":"error","error":{"type":"api_error","message":"x"}}'
    assert ANTHROPIC.stream_error(body) == b"event: error\ndata: " + body + b"\n\n"
    assert OPENAI.stream_error(b'{"error":{}}') == b'data: {"error":{}}\n\n'


def test_cache_views_drop_per_run_noise() -> None:
    body = {"model": "m", "stream": True, "metadata": {"user_id": "session-1"}}
    assert ANTHROPIC.cache_view(body) == {"model": "m"}
    assert OPENAI.cache_view({"model": "m", "user": "u", "stream_options": {}}) == {"model": "m"}


def test_framings_by_content_type() -> None:
    assert framing_for("text/event-stream; charset=utf-8") is SSE
    assert framing_for("application/json") is None
    event = SseEvent("ping", "{}")
    assert SSE.parser().feed(SSE.encode(event)) == [event]


def test_adapters_and_translators_per_provider_kind() -> None:
    assert adapter_for("anthropic").key_headers("k") == (("x-api-key", "k"),)
    assert adapter_for("openai").key_headers("k") == (("authorization", "Bearer k"),)
    assert translator_for("anthropic", "anthropic") is IDENTITY
    # The Anthropic <-> OpenAI pairs are registered (extproc.translate.registry).
    assert translator_for("anthropic", "openai") is not None
    assert translator_for("openai", "anthropic") is not None


class Signer:
    """A credential provider that signs what leaves: it must see the final request."""

    def __init__(self) -> None:
        self.seen: list[UpstreamRequest] = []

    async def authorize(self, request: UpstreamRequest) -> Sequence[tuple[str, str]]:
        self.seen.append(request)
        return (("authorization", f"Signed {len(request.body)}"),)

    def describe(self) -> str:
        return "test signer"


async def test_a_credential_provider_signs_the_request_as_it_leaves() -> None:
    config = parse_config(
        {
            "providers": {"main": {"api": "anthropic", "base_url": "https://llm.internal/api"}},
            "models": {"aliases": {"fast": "claude-haiku-4-5"}},
        }
    )
    gw = Gateway.from_config(config, metrics=Metrics(), audit=_Sink(), store=MemoryStore())
    signer = Signer()
    gw.credentials = {"main": signer}
    stream = RequestStream(gw)
    headers = {":method": "POST", ":path": "/v1/messages", "x-api-key": "caller"}
    await stream.request_headers(headers, False)
    body = {"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    decision = await stream.request_body(orjson.dumps(body), True)
    assert isinstance(decision, Continue)
    assert decision.body is not None  # the alias was mapped: the body changed
    (request,) = signer.seen
    assert request.body == decision.body  # it signed the bytes that leave
    assert request.path == "/api/v1/messages"  # and the path they go to
    assert request.authority == "llm.internal"
    assert request.final_headers()["x-gateway-cluster"] == "provider_main"
    assert ("authorization", f"Signed {len(decision.body)}") in decision.headers.set
    assert "x-api-key" in decision.headers.remove  # the caller's key never leaves
    await stream.close()


class _Sink:
    def write(self, record: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class ModelInQuery(AnthropicMessages):
    """A URL-model dialect, as Bedrock's `/model/{id}/invoke` will be: here the model
    rides in the query so the test can use a path the gateway already serves."""

    model_in = ModelIn.URL

    def request_model(self, path: str, body_model: str | None) -> str | None:
        return path.partition("?model=")[2] or None

    def request_stream(self, path: str, body_stream: bool) -> bool:
        return path.endswith("&stream")

    def with_model(self, path: str, body: dict[str, Any], model: str) -> str:
        return f"{path.partition('?')[0]}?model={model}"


async def test_a_url_model_dialect_reads_and_writes_the_model_in_the_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url_dialect = ModelInQuery()
    monkeypatch.setattr(stream_module, "dialect_of", lambda name: url_dialect)
    config = parse_config(
        {
            "providers": {"main": {"api": "anthropic", "base_url": "https://llm.internal"}},
            "models": {"aliases": {"fast": "claude-haiku-4-5"}},
        }
    )
    gw = Gateway.from_config(config, metrics=Metrics(), audit=_Sink(), store=MemoryStore())
    stream = RequestStream(gw)
    headers = {":method": "POST", ":path": "/v1/messages?model=fast", "x-api-key": "k"}
    await stream.request_headers(headers, False)
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}  # no model
    decision = await stream.request_body(orjson.dumps(body), True)
    assert isinstance(decision, Continue)
    assert (":path", "/v1/messages?model=claude-haiku-4-5") in decision.headers.set
    assert stream.request is not None
    assert (stream.request.model, stream.served_model) == ("fast", "claude-haiku-4-5")
    await stream.close()


def test_the_billing_block_is_held_out_by_the_anthropic_dialect_only() -> None:
    billing = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"}
    rest = {"type": "text", "text": "You are Claude Code."}
    body = {"system": [billing, rest], "messages": []}
    screened, held = ANTHROPIC.held_out(body)
    assert (screened["system"], held) == ([rest], billing)
    assert body["system"] == [billing, rest]  # the caller's body is left alone
    rewritten = {**screened, "system": [{"type": "text", "text": "[REDACTED]"}]}
    ANTHROPIC.put_back(rewritten, held)
    assert rewritten["system"][0] is billing  # forwarded byte for byte, first
    plain = {"system": [rest], "messages": []}
    assert ANTHROPIC.held_out(plain) == (plain, None)
    assert OPENAI.held_out(body) == (body, None)  # no such block in Chat Completions
