"""The sign-in protocol's cores: device flow and refresh tokens on both stores, tokens,
revocation, group policy, managed-settings checksums, OTLP stamping, and the
unauthenticated endpoints' refusals (rate limit, oversized forms, wrong methods)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from extproc.errors import Unauthorized
from extproc.signin import managed
from extproc.signin.config import GroupPolicy, SsoConfig
from extproc.signin.flow import DeviceFlow, GrantError, normalize_user_code
from extproc.signin.oidc import OidcClient
from extproc.signin.otlp import stamp_json, stamp_protobuf
from extproc.signin.policy import policy_for
from extproc.signin.service import SignIn
from extproc.signin.tokens import (
    InvalidToken,
    Revocations,
    Session,
    TokenSigner,
    load_private_key,
)
from extproc.store import ManualClock
from extproc.store.memory import MemoryStore
from tests.store_fixtures import StoreHarness, harness, redis_server

__all__ = ["harness", "redis_server"]  # fixtures used by name below

NOW = 1_750_000_000.0
ALICE = Session("alice@example.com", "alice@example.com", ("eng",), "sid-1")


def sso(**fields: Any) -> SsoConfig:
    data: dict[str, Any] = {
        "oidc": {
            "issuer": "https://idp.example.com",
            "client_id": "gw",
            "client_secret": {"value": "s"},
        },
        "groups": [
            {"group": "opus-*", "models": ["claude-opus-*"]},
            {"group": "eng", "team": "eng"},
        ],
    }
    return SsoConfig.model_validate({**data, **fields})


async def approved(flow: DeviceFlow, client: str | None = None) -> str:
    device_code, user_code = await flow.start(client, NOW)
    found = await flow.by_user_code(user_code.lower().replace("-", " "), NOW)
    assert found is not None
    await flow.decide(*found, ALICE, NOW)
    return device_code


async def test_device_flow_pending_slow_down_expiry(harness: StoreHarness) -> None:
    flow = DeviceFlow(harness.store, 600, 5, 86400)
    device_code, _ = await flow.start(None, NOW)
    with pytest.raises(GrantError) as pending:
        await flow.poll(device_code, None, NOW + 6)
    assert pending.value.error == "authorization_pending"
    with pytest.raises(GrantError) as slow:
        await flow.poll(device_code, None, NOW + 7)
    assert slow.value.error == "slow_down"
    assert "10 s" in slow.value.description  # the interval grew by 5 s
    with pytest.raises(GrantError) as expired:
        await flow.poll(device_code, None, NOW + 601)
    assert expired.value.error == "expired_token"


async def test_device_code_single_use_even_when_raced(harness: StoreHarness) -> None:
    flow = DeviceFlow(harness.store, 600, 5, 86400)
    device_code = await approved(flow)
    results = await asyncio.gather(
        *(flow.poll(device_code, None, NOW + 10) for _ in range(5)), return_exceptions=True
    )
    issued = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, GrantError)]
    assert len(issued) == 1
    assert {r.error for r in refused} == {"invalid_grant"}
    assert issued[0].session.user == ALICE.user


async def test_wrong_client_and_unknown_codes(harness: StoreHarness) -> None:
    flow = DeviceFlow(harness.store, 600, 5, 86400)
    device_code = await approved(flow, client="claude-code")
    for code, client in ((device_code, "other"), (device_code, None), ("nope", "claude-code")):
        with pytest.raises(GrantError) as refused:
            await flow.poll(code, client, NOW + 10)
        assert refused.value.error == "invalid_grant"
    assert await flow.by_user_code("BBBB-BBBB", NOW) is None


async def test_refresh_tokens_rotate_and_are_bound_to_the_client(harness: StoreHarness) -> None:
    flow = DeviceFlow(harness.store, 600, 5, 86400)
    issued = await flow.issue(ALICE, "cc", NOW)
    with pytest.raises(GrantError):
        await flow.take_refresh(issued.refresh_token, "someone-else")
    issued = await flow.issue(ALICE, "cc", NOW)
    session, at = await flow.take_refresh(issued.refresh_token, "cc")
    assert (session, at) == (ALICE, NOW)
    with pytest.raises(GrantError) as replay:
        await flow.take_refresh(issued.refresh_token, "cc")
    assert (replay.value.error, replay.value.status) == ("invalid_grant", 401)


def test_user_codes_are_normalised() -> None:
    assert normalize_user_code(" wdjb mjht ") == "WDJB-MJHT"


def test_tokens_expire_and_need_our_key() -> None:
    clock = ManualClock(NOW)
    signer = TokenSigner(load_private_key(None), "gw", 60, clock.time)
    token = signer.mint(ALICE)
    assert signer.check(token).session == ALICE
    other = TokenSigner(load_private_key(None), "gw", 60, clock.time)
    with pytest.raises(InvalidToken):
        other.check(token)
    clock.advance(120)
    with pytest.raises(InvalidToken, match="expired"):
        signer.check(token)


def test_tokens_of_a_previous_key_stay_valid_after_rotation() -> None:
    old, new = load_private_key(None), load_private_key(None)
    token = TokenSigner(old, "gw", 60).mint(ALICE)
    assert TokenSigner(new, "gw", 60, previous=[old]).check(token).session == ALICE
    with pytest.raises(InvalidToken, match="unknown signing key"):
        TokenSigner(new, "gw", 60).check(token)
    assert not TokenSigner(new, "gw", 60).owns(token)  # e.g. an IdP's JWT for auth.jwt
    assert not TokenSigner(new, "gw", 60).owns("sk-ant-api03-xyz")


async def test_revocation_reaches_a_replica_after_its_cache() -> None:
    store = MemoryStore()
    signer = TokenSigner(load_private_key(None), "gw", 600)
    service = SignIn(sso(), store, signer, _oidc(), 3)
    replica = SignIn(sso(), store, signer, _oidc(), 3)
    clock = ManualClock()
    replica.revocations = Revocations(store, 3, clock=clock.time)  # time moves when told
    token = service.signer.mint(ALICE)
    assert (await replica.authenticate(token)).user == ALICE.user  # its cache is filled
    await service.revoke_user(ALICE.user)
    clock.advance(3)  # past the replica's revocation cache, without sleeping
    with pytest.raises(Unauthorized) as refused:
        await replica.authenticate(token)
    assert refused.value.retryable is False  # rendered as x-should-retry: false


async def test_revocation_list_is_read_once_however_many_requests_wait() -> None:
    reads = 0

    class Counting(MemoryStore):
        async def get(self, key: str) -> bytes | None:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.01)
            return await super().get(key)

    revocations = Revocations(Counting(), 60)
    verdicts = await asyncio.gather(*(revocations.revoked(ALICE, NOW) for _ in range(50)))
    assert not any(verdicts)
    assert reads == 1


def test_first_matching_group_wins_then_default_or_refusal() -> None:
    config = sso()
    assert policy_for(config, ["eng", "opus-devs"]) == ("opus-*", config.groups[0])
    assert policy_for(config, ["eng"]) == ("eng", config.groups[1])
    assert policy_for(config, ["sales"]) is None
    fallback = sso(default={"models": ["claude-haiku-*"]})
    assert policy_for(fallback, ["sales"]) == ("default", GroupPolicy(models=("claude-haiku-*",)))


def test_managed_settings_checksum_sorts_keys_at_every_level() -> None:
    one = {"b": 1, "a": {"d": [1, 2], "c": "é"}}
    two = {"a": {"c": "é", "d": [1, 2]}, "b": 1}
    assert managed.checksum(one) == managed.checksum(two)
    assert managed.answer("g", None, None).status == 404
    etag = f'"{managed.checksum(one)}"'
    assert managed.answer("g", one, etag).status == 304
    assert managed.answer("g", {}, None).status == 200  # an empty policy is not "none"


def test_otlp_json_and_protobuf_are_stamped() -> None:
    stamped = stamp_json(b'{"resourceLogs":[{"scopeLogs":[]}]}', "/v1/logs", {"enduser.id": "a"})
    resource = orjson.loads(stamped)["resourceLogs"][0]["resource"]
    assert resource["attributes"] == [{"key": "enduser.id", "value": {"stringValue": "a"}}]
    metrics = pytest.importorskip("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2")
    request = metrics.ExportMetricsServiceRequest()
    entry = request.resource_metrics.add()
    entry.resource.attributes.add(key="service.name").value.string_value = "claude-code"
    entry.schema_url = "https://opentelemetry.io/schemas/1.0.0"
    parsed = metrics.ExportMetricsServiceRequest.FromString(
        stamp_protobuf(request.SerializeToString(), {"enduser.id": "a"})
    )
    attributes = {
        a.key: a.value.string_value for a in parsed.resource_metrics[0].resource.attributes
    }
    assert attributes == {"service.name": "claude-code", "enduser.id": "a"}
    assert parsed.resource_metrics[0].schema_url == entry.schema_url


def _oidc() -> OidcClient:
    return OidcClient(sso().oidc, lambda: "s")


async def test_unauthenticated_endpoints_refuse_floods_big_forms_and_wrong_methods() -> None:
    service = SignIn(
        sso(requests_per_minute=3),
        MemoryStore(),
        TokenSigner(load_private_key(None), "gw", 600),
        _oidc(),
        3,
    )
    headers = {"x-forwarded-for": "203.0.113.9", ":authority": "gw.example", ":scheme": "https"}
    big = b"a=" + b"x" * 9000
    assert (await service.handle("POST", "/oauth/token", headers, big)).status == 413
    assert (await service.handle("GET", "/oauth/token", headers, b"")).status == 405
    answer = await service.handle("GET", "/.well-known/oauth-authorization-server", headers, b"")
    assert orjson.loads(answer.body)["token_endpoint"] == "https://gw.example/oauth/token"
    limited = await service.handle("POST", "/oauth/device_authorization", headers, b"")
    assert limited.status == 429
    assert orjson.loads(limited.body)["error"] == "slow_down"
    assert dict(limited.headers)["retry-after"]
    other_ip = {**headers, "x-forwarded-for": "203.0.113.10"}
    assert (
        await service.handle("POST", "/oauth/device_authorization", other_ip, b"")
    ).status == 200
