"""Bedrock and Vertex clients served by each provider kind (extproc.upstream.cloud_clients)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.apis.dialect import dialect_of
from extproc.apis.kind import ApiKind
from extproc.apis.sse import SseEvent
from extproc.config import parse_config
from extproc.upstream import HeaderTranslator, translator_for
from extproc.upstream.adapter import default_provider
from extproc.upstream.cloud_clients import CloudClient

CANONICAL: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "stream": True,
    "anthropic_version": "bedrock-2023-05-31",
    "anthropic_beta": ["interleaved-thinking-2025-05-14"],
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}
BEDROCK_PATH = (
    "/bedrock/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream"
)


@pytest.mark.parametrize(
    ("upstream", "keeps_version", "keeps_beta"),
    [("anthropic", False, False), ("bedrock", True, True), ("vertex", False, False)],
)
def test_request_per_upstream(upstream: ApiKind, keeps_version: bool, keeps_beta: bool) -> None:
    body, path = CloudClient("bedrock", upstream).request(dict(CANONICAL), BEDROCK_PATH)
    assert path == "/v1/messages"
    assert ("anthropic_version" in body) is keeps_version
    assert ("anthropic_beta" in body) is keeps_beta
    assert (body["model"], body["stream"]) == ("claude-sonnet-4-5", True)


def test_an_sdk_version_is_not_passed_to_bedrock() -> None:
    body, _ = CloudClient("bedrock", "bedrock").request(
        {**CANONICAL, "anthropic_version": "2026-10-21"}, BEDROCK_PATH
    )
    assert "anthropic_version" not in body  # the Bedrock adapter sets bedrock-2023-05-31


def test_count_tokens_path() -> None:
    path = "/vertex/projects/p/locations/r/publishers/anthropic/models/count-tokens:rawPredict"
    body, upstream_path = CloudClient("vertex", "anthropic").request(dict(CANONICAL), path)
    assert upstream_path == "/v1/messages/count_tokens"
    assert "stream" not in body


def test_betas_become_the_header_except_for_bedrock() -> None:
    headers = {"anthropic-beta": "claude-code-20250219, interleaved-thinking-2025-05-14"}
    for upstream in ("anthropic", "vertex"):
        translator = CloudClient("bedrock", upstream)
        assert isinstance(translator, HeaderTranslator)
        assert translator.request_headers(CANONICAL, headers) == (
            ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
        )
    assert CloudClient("bedrock", "bedrock").request_headers(CANONICAL, headers) == ()
    assert CloudClient("vertex", "anthropic").request_headers({"model": "m"}, headers) == ()


@pytest.mark.parametrize(
    ("body", "status", "message", "kind"),
    [
        (
            {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
            429,
            "slow",
            "rate_limit_error",
        ),
        ({"message": "Too many tokens"}, 400, "Too many tokens", "invalid_request_error"),
        ({"Message": "denied"}, 403, "denied", "permission_error"),
        ({}, 500, "the provider refused the request", "api_error"),
    ],
)
def test_error_answers_in_the_client_shape(
    body: dict[str, Any], status: int, message: str, kind: str
) -> None:
    bedrock = CloudClient("bedrock", "anthropic").answer(body, status)
    assert bedrock["message"] == message
    assert bedrock["error"] == {"type": kind, "message": message}
    assert bedrock["__type"]
    vertex = CloudClient("vertex", "bedrock").answer(body, status)
    assert vertex == {"type": "error", "error": {"type": kind, "message": message}}


def test_success_answers_pass() -> None:
    answer = {"type": "message", "content": []}
    assert CloudClient("bedrock", "anthropic").answer(answer, 200) == answer


def test_invocation_metrics_only_for_bedrock_clients() -> None:
    stop = SseEvent(
        "message_stop",
        orjson.dumps({"type": "message_stop", "amazon-bedrock-invocationMetrics": {}}).decode(),
    )
    [kept] = CloudClient("bedrock", "bedrock").stream().feed(stop)
    assert kept == stop
    [dropped] = CloudClient("vertex", "bedrock").stream().feed(stop)
    assert orjson.loads(dropped.data) == {"type": "message_stop"}


def test_registered_for_every_pair() -> None:
    for client in ("bedrock", "vertex"):
        for upstream in ("anthropic", "bedrock", "vertex"):
            assert isinstance(translator_for(client, upstream), CloudClient)
    assert translator_for("bedrock", "openai") is None  # 400 wrong_api
    assert dialect_of("bedrock").cache_schema() == "anthropic"


def test_default_provider_for_cloud_clients() -> None:
    only_anthropic = parse_config({})
    assert default_provider(only_anthropic, "bedrock") == "anthropic"
    assert default_provider(only_anthropic, "vertex") == "anthropic"
    openai_only = parse_config(
        {"providers": {"oai": {"api": "openai", "base_url": "https://api.openai.com"}}}
    )
    assert default_provider(openai_only, "bedrock") is None
    assert default_provider(openai_only, "anthropic") is None
