"""Gateway keys, allow-lists, model mapping and routing through real Envoy."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.policies.auth import hash_key, new_key
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

KEYS = {name: new_key(name) for name in ("dev", "sonnet-only", "free-user", "off", "old")}
PROVIDER_SECRET = "sk-ant-held"
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def _key(name: str, **fields: Any) -> dict[str, Any]:
    return {"id": name, "hash": hash_key(KEYS[name]), **fields}


@pytest.fixture(scope="module")
def secured(fake: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["providers"]["openai"]["credential"] = {"value": "sk-oai-held"}
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC).isoformat()
    config["auth"] = {
        "required": True,
        "keys": [
            _key("dev", user="ana", team="platform", project="gw"),
            _key("sonnet-only", user="bo", models=["claude-sonnet-*", "gpt-5*"]),
            _key("free-user", user="cy", tier="free"),
            _key("off", disabled=True),
            _key("old", expires=past),
        ],
    }
    config["tiers"] = {
        "free": {"models": ["internal-*"], "map": {"*": "internal-coder"}},
        "pro": {"map": {"claude-opus-*": "claude-sonnet-4-6"}},
    }
    config["teams"] = {"platform": {"tier": "pro"}}
    config["models"] = {"aliases": {"opus": "claude-opus-4-8"}}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _client(stack: Stack, name: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=KEYS[name], base_url=stack.url, max_retries=0)


def _post(stack: Stack, headers: dict[str, str]) -> httpx.Response:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": MESSAGES}
    headers = {"anthropic-version": "2023-06-01", **headers}
    return httpx.post(f"{stack.url}/v1/messages", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        ({}, 401, "missing gateway key"),
        ({"x-api-key": "sk-ant-not-a-gateway-key"}, 401, "invalid gateway key"),
        ({"x-api-key": "gwk_dev_wrongsecret"}, 401, "invalid gateway key"),
        ({"x-api-key": "gwk_nobody_secret"}, 401, "invalid gateway key"),
        ({"x-api-key": KEYS["off"]}, 401, "disabled"),
        ({"x-api-key": KEYS["old"]}, 401, "expired at 2020-01-01"),
        ({"x-api-key": KEYS["dev"], "authorization": "Bearer other"}, 400, "ANTHROPIC_AUTH_TOKEN"),
    ],
)
def test_refused_callers_never_reach_the_provider(
    secured: Stack, received: FakeProvider, headers: dict[str, str], status: int, fragment: str
) -> None:
    response = _post(secured, headers)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]
    # A retry cannot fix a refused credential: the SDKs and Claude Code must not retry.
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-gateway-error"]
    assert response.headers["x-gateway-request-id"]
    assert "gwk_" not in response.text
    assert received.received == []


def test_key_is_swapped_for_the_provider_credential(secured: Stack, received: FakeProvider) -> None:
    raw = _client(secured, "dev").messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES
    )
    (request,) = received.received
    assert request.headers["x-api-key"] == PROVIDER_SECRET
    assert "gwk_" not in str(request.headers)
    record = record_for(secured, raw.headers["x-gateway-request-id"])
    assert (record["key_id"], record["user"], record["team"], record["project"]) == (
        "dev",
        "ana",
        "platform",
        "gw",
    )
    assert record["caller"] == "dev"
    assert record["identity"] == "key"


def test_bearer_key_works_for_openai_shape(secured: Stack, received: FakeProvider) -> None:
    client = openai.OpenAI(api_key=KEYS["sonnet-only"], base_url=f"{secured.url}/v1", max_retries=0)
    client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    (request,) = received.received
    assert request.headers["authorization"] == "Bearer sk-oai-held"


def test_denied_model_is_403_naming_model_and_allowed(
    secured: Stack, received: FakeProvider
) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        _client(secured, "sonnet-only").messages.create(
            model="claude-opus-4-8", max_tokens=5, messages=MESSAGES
        )
    message = caught.value.body["error"]["message"]  # type: ignore[index]
    assert "'claude-opus-4-8'" in message
    assert "claude-sonnet-*" in message
    assert received.received == []


def test_team_tier_maps_opus_to_sonnet(secured: Stack, received: FakeProvider) -> None:
    """Alias opus -> claude-opus-4-8, then the platform team's pro tier maps it to sonnet."""
    raw = _client(secured, "dev").messages.with_raw_response.create(
        model="opus", max_tokens=5, messages=MESSAGES
    )
    assert received.received[0].json()["model"] == "claude-sonnet-4-6"
    assert received.received[0].json()["messages"] == MESSAGES
    record = record_for(secured, raw.headers["x-gateway-request-id"])
    assert record["requested_model"] == "opus"
    assert record["served_model"] == "claude-sonnet-4-6"
    assert 'requested="opus",served="claude-sonnet-4-6"' in secured.metrics_text()


def test_free_tier_is_served_the_internal_model(secured: Stack, received: FakeProvider) -> None:
    _client(secured, "free-user").messages.create(
        model="claude-opus-4-8", max_tokens=5, messages=MESSAGES
    )
    assert received.received[0].json()["model"] == "internal-coder"


def test_models_list_shows_only_allowed(secured: Stack) -> None:
    listed = [m.id for m in _client(secured, "sonnet-only").models.list()]
    assert listed == ["claude-sonnet-4-6", "gpt-5", "gpt-5-mini"]
    everything = [m.id for m in _client(secured, "dev").models.list()]
    assert "claude-opus-4-8" in everything
    with pytest.raises(anthropic.NotFoundError):
        _client(secured, "sonnet-only").models.retrieve("claude-opus-4-8")


def test_anonymous_passthrough_when_auth_not_required(stack: Stack, received: FakeProvider) -> None:
    """The laptop default: no gateway keys; the provider credential replaces the caller's."""
    assert _post(stack, {"x-api-key": "anything"}).status_code == 200
    assert received.received[0].headers["x-api-key"] != "anything"
