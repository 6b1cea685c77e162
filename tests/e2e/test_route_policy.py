"""Per-route policy from Envoy route metadata, and SSO identity from Envoy's jwt_authn."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from extproc.policies.auth import hash_key, new_key
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider, run_in_thread
from tests.harness import Stack, gateway_config

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: Any = [{"role": "user", "content": "hi"}]
CI_KEY = new_key("ci")


@pytest.fixture(scope="module")
def advisor_fake() -> Iterator[FakeProvider]:
    with run_in_thread() as provider:
        yield provider


@pytest.fixture(scope="module")
def personalities(fake: FakeProvider, advisor_fake: FakeProvider) -> Iterator[Stack]:
    """examples/two-personality.yaml with both providers pointed at fakes."""
    config = yaml.safe_load((ROOT / "examples" / "two-personality.yaml").read_text())
    config.update({k: v for k, v in gateway_config(fake.url).items() if k != "providers"})
    config["envoy"]["bootstrap"] = str(ROOT / "envoy" / "two-personality.yaml")
    config["providers"]["anthropic"].update(base_url=fake.url, credential={"value": "sk-agent"})
    config["providers"]["advisor"].update(
        base_url=advisor_fake.url, credential={"value": "sk-advisor"}
    )
    config["auth"]["keys"][0]["hash"] = hash_key(CI_KEY)
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _claude(stack: Stack, personality: str | None) -> anthropic.Anthropic:
    headers = {"x-claude-personality": personality} if personality else {}
    return anthropic.Anthropic(
        api_key=CI_KEY, base_url=stack.url, max_retries=0, default_headers=headers
    )


def test_agent_may_use_only_opus_on_the_agent_cluster(
    personalities: Stack, fake: FakeProvider, advisor_fake: FakeProvider
) -> None:
    fake.clear()
    advisor_fake.clear()
    raw = _claude(personalities, "agent").messages.with_raw_response.create(
        model="claude-opus-4-8", max_tokens=5, messages=MESSAGES
    )
    assert [r.json()["model"] for r in fake.received] == ["claude-opus-4-8"]
    assert fake.received[0].headers["x-api-key"] == "sk-agent"
    assert advisor_fake.received == []
    assert record_for(personalities, raw.headers["x-gateway-request-id"])["route"] == "agent"
    with pytest.raises(anthropic.PermissionDeniedError, match="claude-opus-4-8"):
        _claude(personalities, "agent").messages.create(
            model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES
        )


def test_advisor_always_gets_sonnet_on_its_own_cluster(
    personalities: Stack, fake: FakeProvider, advisor_fake: FakeProvider
) -> None:
    fake.clear()
    advisor_fake.clear()
    message = _claude(personalities, "advisor").messages.create(
        model="claude-opus-4-8", max_tokens=5, messages=MESSAGES
    )
    assert message.model == "claude-sonnet-4-6"
    assert [r.json()["model"] for r in advisor_fake.received] == ["claude-sonnet-4-6"]
    assert advisor_fake.received[0].headers["x-api-key"] == "sk-advisor"
    assert fake.received == []


@pytest.mark.parametrize("personality", [None, "reviewer"])
def test_other_personalities_are_refused(
    personalities: Stack, fake: FakeProvider, personality: str | None
) -> None:
    fake.clear()
    with pytest.raises(anthropic.PermissionDeniedError, match="agent or advisor"):
        _claude(personalities, personality).messages.create(
            model="claude-opus-4-8", max_tokens=5, messages=MESSAGES
        )
    assert fake.received == []


# -- SSO --------------------------------------------------------------------------------


def _jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return {
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": "t",
        "n": b64(numbers.n),
        "e": b64(numbers.e),
    }


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def sso(fake: FakeProvider, signing_key: rsa.RSAPrivateKey) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["auth"] = {
        "required": True,
        "jwt": {"user_claim": "email", "team_claim": "groups", "tier_claim": "plan"},
        "keys": [{"id": "ci", "hash": hash_key(CI_KEY), "team": "ci-team"}],
    }
    config["tiers"] = {"pro": {}}
    config["envoy"]["bootstrap"] = str(ROOT / "envoy" / "jwt-authn.yaml")
    stack = Stack(config)
    bootstrap = stack.bootstrap()
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (jwt_filter,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.jwt_authn"
    ]
    jwt_filter["providers"]["sso"]["local_jwks"]["inline_string"] = json.dumps(
        {"keys": [_jwk(signing_key)]}
    )
    stack.start_extproc()
    stack.start_envoy(bootstrap)
    yield stack
    stack.close()


def _token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    payload = {
        "iss": "https://sso.example.com",
        "aud": "llm-gateway",
        "exp": int(time.time()) + 600,
        "email": "dana@example.com",
        "groups": ["research"],
        "plan": "pro",
        **claims,
    }
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "t"})


def test_jwt_claims_become_the_identity(
    sso: Stack, fake: FakeProvider, signing_key: rsa.RSAPrivateKey
) -> None:
    fake.clear()
    client = anthropic.Anthropic(auth_token=_token(signing_key), base_url=sso.url, max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="claude-opus-4-8", max_tokens=5, messages=MESSAGES
    )
    record = record_for(sso, raw.headers["x-gateway-request-id"])
    assert (record["identity"], record["user"], record["team"], record["tier"]) == (
        "jwt",
        "dana@example.com",
        "research",
        "pro",
    )
    (request,) = fake.received
    assert "authorization" not in request.headers  # the SSO token never leaves
    assert request.headers["x-api-key"] == "sk-held"


def test_key_wins_over_jwt(sso: Stack, signing_key: rsa.RSAPrivateKey) -> None:
    headers = {
        "x-api-key": CI_KEY,
        "authorization": f"Bearer {_token(signing_key)}",
        "anthropic-version": "2023-06-01",
    }
    body = {"model": "claude-opus-4-8", "max_tokens": 5, "messages": MESSAGES}
    response = httpx.post(f"{sso.url}/v1/messages", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    record = record_for(sso, response.headers["x-gateway-request-id"])
    assert (record["identity"], record["key_id"], record["team"]) == ("key", "ci", "ci-team")


@pytest.mark.parametrize(
    "claims", [{"exp": int(time.time()) - 60}, {"aud": "someone-else"}, {"iss": "https://evil"}]
)
def test_invalid_jwt_is_refused(
    sso: Stack, fake: FakeProvider, signing_key: rsa.RSAPrivateKey, claims: dict[str, Any]
) -> None:
    fake.clear()
    client = anthropic.Anthropic(
        auth_token=_token(signing_key, **claims), base_url=sso.url, max_retries=0
    )
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="claude-opus-4-8", max_tokens=5, messages=MESSAGES)
    assert fake.received == []
