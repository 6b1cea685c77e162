"""Pure policy functions: request parsing, classification, identity, model policy, routing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from extproc.apis import Endpoint, classify
from extproc.config import AuthConfig, Config, CredentialSource, ProfileConfig, parse_config
from extproc.credentials import Credential, CredentialMissing
from extproc.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    Unavailable,
)
from extproc.policies import auth, models
from extproc.policies.profiles import ProfileResolver, RoutePolicyError
from extproc.policies.request import parse_request
from extproc.policies.routing import Target, upstream_headers
from extproc.store import StoreError
from extproc.store.memory import MemoryStore


@pytest.mark.parametrize(
    ("method", "path", "headers", "api", "endpoint"),
    [
        ("POST", "/v1/messages", {}, "anthropic", Endpoint.MESSAGES),
        ("POST", "/v1/messages?beta=true", {}, "anthropic", Endpoint.MESSAGES),
        ("POST", "/v1/messages/count_tokens", {}, "anthropic", Endpoint.COUNT_TOKENS),
        ("POST", "/v1/chat/completions", {}, "openai", Endpoint.CHAT_COMPLETIONS),
        ("GET", "/v1/models", {"anthropic-version": "x"}, "anthropic", Endpoint.MODELS),
        ("GET", "/v1/models", {"authorization": "Bearer k"}, "openai", Endpoint.MODELS),
        ("GET", "/v1/models/claude-opus-4-8", {"x-api-key": "k"}, "anthropic", Endpoint.MODELS),
    ],
)
def test_classify(
    method: str, path: str, headers: dict[str, str], api: str, endpoint: Endpoint
) -> None:
    route = classify(method, path, headers)
    assert (route.api, route.endpoint) == (api, endpoint)


@pytest.mark.parametrize(
    ("method", "path", "error"),
    [
        ("POST", "/v1/complete", NotFound),
        ("GET", "/v2", NotFound),
        ("POST", "/", MethodNotAllowed),
        ("POST", "/health", MethodNotAllowed),
        ("GET", "/v1/models/a/b", NotFound),
        ("GET", "/v1/messages", MethodNotAllowed),
        ("DELETE", "/v1/models", MethodNotAllowed),
    ],
)
def test_classify_refuses(method: str, path: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        classify(method, path, {})


@pytest.mark.parametrize(
    "model",
    [
        "claude-opus-4-8",
        "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
        "meta-llama/Llama-3.1-8B@v1",
    ],
)
def test_valid_model_names(model: str) -> None:
    parsed = parse_request(f'{{"model": "{model}", "stream": true}}'.encode(), Endpoint.MESSAGES)
    assert (parsed.model, parsed.stream) == (model, True)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a b"}',
        b'{"model": "a\\nb"}',
        b'{"model": "a\\u0007"}',
        b'{"model": "-leading"}',
        b'{"model": ""}',
        b'{"model": ["x"]}',
        b'{"model": "x", "stream": 1}',
    ],
)
def test_invalid_model_names(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(body, Endpoint.MESSAGES)


def test_stream_flag_only_counts_for_generating_endpoints() -> None:
    parsed = parse_request(b'{"model": "m", "stream": true}', Endpoint.COUNT_TOKENS)
    assert parsed.stream is False


# -- identity -----------------------------------------------------------------------------


def test_key_format_and_hash() -> None:
    key = auth.new_key("ci-bot")
    assert auth.key_id_of(key) == "ci-bot"
    assert auth.hash_key(key).startswith("sha256:")
    assert auth.key_id_of("sk-ant-xyz") is None
    assert auth.key_id_of("gwk_onlyid") is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-api-key": "a"}, "a"),
        ({"authorization": "Bearer b"}, "b"),
        ({"authorization": "bearer b"}, "b"),
        ({"x-api-key": "a", "authorization": "Bearer a"}, "a"),
        ({"authorization": "Basic zzz"}, None),
        ({}, None),
    ],
)
def test_presented_key(headers: dict[str, str], expected: str | None) -> None:
    assert auth.presented_key(headers) == expected


def test_two_different_keys_are_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="two different credentials"):
        auth.presented_key({"x-api-key": "a", "authorization": "Bearer b"})


def _directory(store: MemoryStore, wall: list[float], mono: list[float]) -> auth.KeyDirectory:
    return auth.KeyDirectory(
        AuthConfig(cache_seconds=3), store, clock=lambda: mono[0], wall_clock=lambda: wall[0]
    )


def test_store_keys_rotation_revocation_and_cache() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        wall, mono = [1000.0], [0.0]
        directory = _directory(store, wall, mono)
        key = auth.new_key("k1")
        record = auth.KeyRecord(id="k1", hash=auth.hash_key(key), team="t", expires_at=2000.0)
        await store.set(auth.STORE_PREFIX + "k1", record.to_json())
        assert (await directory.authenticate(key)).team == "t"
        await store.set(auth.STORE_PREFIX + "k1", auth.revoked(record).to_json())
        assert (await directory.authenticate(key)).team == "t"  # cached for 3 s
        mono[0] = 3.5
        with pytest.raises(Unauthorized, match="disabled"):
            await directory.authenticate(key)
        await store.set(auth.STORE_PREFIX + "k1", record.to_json())
        mono[0], wall[0] = 10.0, 2000.0
        with pytest.raises(Unauthorized, match="expired"):
            await directory.authenticate(key)

    asyncio.run(scenario())


def test_rotation_overlap_accepts_previous_until_deadline() -> None:
    old, new = auth.new_key("k"), auth.new_key("k")
    record = auth.KeyRecord(
        id="k", hash=auth.hash_key(new), previous_hash=auth.hash_key(old), previous_expires_at=50.0
    )
    assert record.matches(new, now=100.0)
    assert record.matches(old, now=49.0)
    assert not record.matches(old, now=51.0)


def test_jwt_claims_mapping() -> None:
    from extproc.config import JwtConfig

    config = JwtConfig(user_claim="email", team_claim="groups", tier_claim=None)
    identity = auth.identity_from_claims({"email": "a@b", "groups": ["x", "y"]}, config)
    assert identity is not None
    assert (identity.source, identity.user, identity.team, identity.tier) == (
        "jwt",
        "a@b",
        "x",
        None,
    )
    assert auth.identity_from_claims({"groups": ["x"]}, config) is None


# -- model policy ---------------------------------------------------------------------------


def _config(**data: Any) -> Config:
    base: dict[str, Any] = {
        "providers": {
            "anthropic": {"api": "anthropic", "base_url": "https://api.anthropic.com"},
            "bedrock": {"api": "anthropic", "base_url": "https://bedrock-proxy.internal"},
            "vllm": {"api": "openai", "base_url": "http://vllm:8000"},
        }
    }
    return parse_config({**base, **data})


def test_served_model_order_alias_map_pin_tier() -> None:
    config = _config(
        models={"aliases": {"opus": "claude-opus-4-8"}},
        tiers={"pro": {"map": {"claude-opus-*": "claude-sonnet-4-6"}}},
    )
    tier = config.tiers["pro"]
    plain = ProfileConfig()
    assert models.served_model("opus", config, plain, None) == "claude-opus-4-8"
    assert models.served_model("opus", config, plain, tier) == "claude-sonnet-4-6"
    pinned = ProfileConfig(pin="claude-opus-4-1")
    assert models.served_model("haiku", config, pinned, None) == "claude-opus-4-1"
    assert models.served_model("haiku", config, pinned, tier) == "claude-sonnet-4-6"
    mapped = ProfileConfig(map={"claude-haiku-*": "claude-haiku-4-5"})
    assert models.served_model("claude-haiku-3", config, mapped, None) == "claude-haiku-4-5"


def test_allow_lists_intersect_and_name_the_policy() -> None:
    config = _config(teams={"ml": {"models": ["claude-*"]}})
    identity = auth.Identity(
        source="key", key_id="k", team="ml", models=("claude-sonnet-*", "gpt-*")
    )
    lists = models.allow_lists(config, ProfileConfig(), identity, None)
    models.check_allowed("claude-sonnet-4-6", "claude-sonnet-4-6", lists)
    with pytest.raises(Forbidden, match="by the team policy; allowed: claude-\\*"):
        models.check_allowed("gpt-5", "gpt-5", lists)
    with pytest.raises(Forbidden, match="by the key policy"):
        models.check_allowed("claude-opus-4-8", "claude-opus-4-8", lists)
    assert models.visible("claude-sonnet-4-6", lists)
    assert not models.visible("gpt-5", lists)


def test_team_tier_is_used_when_the_key_has_none() -> None:
    config = _config(tiers={"free": {"models": ["internal-*"]}}, teams={"t": {"tier": "free"}})
    assert models.tier_of(config, auth.Identity(source="key", team="t")) is config.tiers["free"]
    assert models.tier_of(config, auth.Identity(source="anonymous")) is None


def test_provider_choice() -> None:
    config = _config(models={"routes": [{"match": "claude-3-*", "provider": "bedrock"}]})
    plain = ProfileConfig()
    assert models.choose_provider(config, plain, "claude-3-haiku", "anthropic").name == "bedrock"
    assert models.choose_provider(config, plain, "claude-opus-4-8", "anthropic").name == "anthropic"
    assert models.choose_provider(config, plain, "llama", "openai").name == "vllm"
    routed = ProfileConfig(provider="vllm")
    # An Anthropic caller on an OpenAI-compatible provider is translated (issue 13), no
    # longer refused as wrong_api.
    target = models.choose_provider(config, routed, "llama", "anthropic")
    assert target.name == "vllm"
    assert target.adapter.translator("anthropic") is not None


def test_served_model_key_map_after_the_route_before_the_tier() -> None:
    config = _config(tiers={"free": {"map": {"claude-*": "qwen3-32b"}}})
    key_map = {"gpt-4": "claude-sonnet-4-6", "claude-opus-*": "claude-sonnet-4-6"}
    plain = ProfileConfig(map={"gpt-4o-mini": "claude-haiku-4-5"})
    assert models.served_model("gpt-4", config, plain, None, key_map) == "claude-sonnet-4-6"
    assert models.served_model("claude-opus-4-8", config, plain, None, key_map) == (
        "claude-sonnet-4-6"
    )
    assert models.served_model("gpt-4", config, plain, config.tiers["free"], key_map) == (
        "qwen3-32b"
    )
    pinned = ProfileConfig(pin="claude-opus-4-8")
    assert models.served_model("x", config, pinned, None, key_map) == "claude-sonnet-4-6"


def test_mapped_names_are_listed_when_their_served_model_is_allowed() -> None:
    config = _config(models={"aliases": {"opus": "claude-opus-4-8"}})
    profile = ProfileConfig(map={"gpt-4": "claude-sonnet-4-6", "gpt-*": "claude-haiku-4-5"})
    identity = auth.Identity(source="key", key_id="k", models=("claude-sonnet-*",))
    lists = models.allow_lists(config, profile, identity, None)
    key_map = {"gpt-4o-mini": "claude-sonnet-4-6"}
    assert models.mapped_names(config, profile, None, key_map, lists) == ["gpt-4"]
    assert models.mapped_names(config, profile, None, key_map, []) == [
        "opus",
        "gpt-4",
        "gpt-4o-mini",
    ]


def test_upstream_headers_swap_credential_and_rebase_path() -> None:
    config = _config()
    anthropic_target = Target("anthropic", config.providers["anthropic"])
    changes = upstream_headers(anthropic_target, "/v1/messages", "sk-held")
    assert ("x-api-key", "sk-held") in changes.set
    assert "authorization" in changes.remove
    rebased = parse_config(
        {"providers": {"p": {"api": "openai", "base_url": "https://host/api/"}}}
    ).providers["p"]
    changes = upstream_headers(Target("p", rebased), "/v1/chat/completions", "k")
    assert (":path", "/api/v1/chat/completions") in changes.set
    assert ("authorization", "Bearer k") in changes.set
    assert ("x-gateway-cluster", "provider_p") in changes.set


def test_route_profiles_and_overrides() -> None:
    config = _config(profiles={"default": {}, "agent": {"models": ["claude-opus-4-8"]}})
    resolver = ProfileResolver(config)
    assert resolver.resolve({}, "r").models is None
    assert resolver.resolve({"profile": "agent"}, "r").models == ("claude-opus-4-8",)
    override = resolver.resolve({"profile": "agent", "pin": "claude-opus-4-8"}, "r")
    assert override.pin == "claude-opus-4-8"
    for bad in ({"profile": "nope"}, {"profile": "agent", "colour": 1}, {"provider": "ghost"}):
        with pytest.raises(RoutePolicyError, match="route 'r'"):
            resolver.resolve(bad, "r")


# -- credentials -----------------------------------------------------------------------------


def test_credentials_from_env_file_and_rotation(tmp_path: Path) -> None:
    assert Credential(CredentialSource(env="K"), environ={"K": " v "}).get() == "v"
    with pytest.raises(CredentialMissing, match="K is not set"):
        Credential(CredentialSource(env="K"), environ={}).get()
    secret = tmp_path / "secret"
    secret.write_text("one\n")
    now = [0.0]
    credential = Credential(CredentialSource(file=secret), clock=lambda: now[0])
    assert credential.get() == "one"
    secret.write_text("two\n")
    import os

    os.utime(secret, (1, 1))
    assert credential.get() == "one"  # re-checked at most once a second
    now[0] = 2.0
    assert credential.get() == "two"
    secret.unlink()
    now[0] = 4.0
    with pytest.raises(CredentialMissing, match="cannot read"):
        credential.get()


def test_an_unreachable_key_store_is_a_retryable_503_unless_the_key_is_cached() -> None:
    class DownStore(MemoryStore):
        down = False

        async def get(self, key: str) -> bytes | None:
            if self.down:
                raise StoreError("connection refused")
            return await super().get(key)

    async def scenario() -> None:
        store = DownStore()
        mono = [0.0]
        directory = _directory(store, [1000.0], mono)
        cached, fresh = auth.new_key("k1"), auth.new_key("k2")
        for key_id, key in (("k1", cached), ("k2", fresh)):
            record = auth.KeyRecord(id=key_id, hash=auth.hash_key(key))
            await store.set(auth.STORE_PREFIX + key_id, record.to_json())
        await directory.authenticate(cached)
        store.down, mono[0] = True, 10.0
        assert (await directory.authenticate(cached)).caller is not None  # last known record
        with pytest.raises(Unavailable) as raised:
            await directory.authenticate(fresh)
        assert raised.value.reason == "store_down"  # one reason per cause, as elsewhere
        assert raised.value.retryable

    asyncio.run(scenario())
