"""SSO tokens on the gateway's test clock (tests/service/harness.py): a token stops working
when its lifetime passes, and a revoked user is refused by another replica once its
revocation cache has passed, both crossed by advancing time instead of sleeping."""

from __future__ import annotations

from typing import Any

from extproc.signin.tokens import Session
from extproc.store import ManualClock
from extproc.store.memory import MemoryStore
from tests.service.harness import ServiceStack, service_config


def _config(pem: str) -> dict[str, Any]:
    return service_config(
        auth={"required": True, "cache_seconds": 3},
        sso={
            "oidc": {
                "issuer": "https://idp.test",
                "client_id": "c",
                "client_secret": {"value": "s"},
            },
            "signing_key": {"value": pem},
            "access_token_seconds": 600,
            "groups": [{"group": "eng", "settings": {"availableModels": ["sonnet"]}}],
        },
    )


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


async def _settings(stack: ServiceStack, token: str) -> int:
    headers = {"authorization": f"Bearer {token}"}
    return (await stack.drive("GET", "/managed/settings", headers=headers)).status


async def test_a_token_stops_working_when_its_lifetime_passes() -> None:
    stack = ServiceStack(_config(_pem()))
    assert stack.gateway.signin is not None
    token = stack.gateway.signin.signer.mint(Session("ana", None, ("eng",), "sid-1"))
    assert await _settings(stack, token) == 200
    stack.clock.advance(600 + 10)  # past access_token_seconds (and its 5 s of leeway)
    assert await _settings(stack, token) == 401
    await stack.close()


async def test_a_revoked_user_is_refused_by_another_replica_after_its_cache() -> None:
    clock, pem = ManualClock(), _pem()
    store = MemoryStore(clock=clock)
    first, second = [ServiceStack(_config(pem), clock=clock, store=store) for _ in range(2)]
    assert first.gateway.signin is not None
    assert second.gateway.signin is not None
    token = first.gateway.signin.signer.mint(Session("ana", None, ("eng",), "sid-2"))
    assert [await _settings(first, token), await _settings(second, token)] == [200, 200]
    clock.advance(1)  # the revocation comes after the token was issued
    await first.gateway.signin.revoke_user("ana")
    clock.advance(3)  # past auth.cache_seconds: every replica re-reads its revocations
    assert [await _settings(first, token), await _settings(second, token)] == [401, 401]
    for stack in (first, second):
        await stack.close()
