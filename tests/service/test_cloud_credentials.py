"""Gateway-held cloud credentials against fake AWS / Google endpoints on loopback.

The AWS chain is botocore's (web identity via a fake STS, the container endpoint, env
keys); signatures are checked by the fake Bedrock, which recomputes them with botocore.
Google tokens come from a service account key whose RS256 assertion the fake token
endpoint verifies. Refresh is driven by an injected clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from botocore.eventstream import EventStreamBuffer
from yarl import URL

from extproc.cloud import azure, upstreams
from extproc.cloud.aws import AwsCredentials
from extproc.cloud.config import (
    BedrockSettings,
    ClaudePlatformAwsSettings,
    FoundrySettings,
    VertexSettings,
)
from extproc.cloud.google import GoogleToken
from extproc.cloud.providers import credential_for
from extproc.cloud.refresh import Refreshing, Snapshot
from extproc.cloud.sigv4 import BEDROCK_SERVICE, sign_with
from extproc.credentials import CredentialMissing, CredentialSource
from tests.cloud_fakes import (
    AwsIdentity,
    FakeAwsCredentials,
    FakeBedrock,
    FakeFoundry,
    FakeGoogle,
    SignatureError,
    verify_sigv4,
)

ROLE = "arn:aws:iam::123456789012:role/gateway"
REQUEST = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


@dataclass(frozen=True)
class SigV4Signer:
    """Signs with the credentials' current snapshot, as `SigV4Provider` does per request."""

    credentials: AwsCredentials
    service: str
    region: str

    def sign(self, method: str, url: str, body: bytes) -> dict[str, str]:
        current = self.credentials.current()
        return sign_with(current, self.service, self.region, method, url, body)


AwsFakes = tuple[AwsIdentity, FakeAwsCredentials, FakeBedrock]


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An environment with no ambient AWS credentials or config files."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


@pytest.fixture
async def aws(aws_env: None, tmp_path: Path) -> AsyncIterator[AwsFakes]:
    identity = AwsIdentity()
    web_token = "eyJ.k8s-projected.token"
    creds = FakeAwsCredentials(identity, role_arn=ROLE, web_token=web_token)
    bedrock = FakeBedrock(identity)
    await creds.start()
    await bedrock.start()
    (tmp_path / "token").write_text(web_token)
    try:
        yield identity, creds, bedrock
    finally:
        await bedrock.stop()
        await creds.stop()


async def _invoke(
    bedrock: FakeBedrock, signer: SigV4Signer, payload: dict[str, object]
) -> tuple[int, bytes]:
    model = upstreams.bedrock_model_id("anthropic.claude-sonnet-4-5-20250929-v1:0", {}, "us")
    request = upstreams.bedrock_request(
        "messages", payload, model, ["interleaved-thinking-2025-05-14"]
    )
    body = orjson.dumps(request.body)
    url = bedrock.url + request.path
    headers = dict(request.set_headers) | signer.sign("POST", url, body)
    # encoded=True: yarl would turn `%3A` back into `:`, and AWS checks the path as sent.
    target = URL(url, encoded=True)
    async with (
        aiohttp.ClientSession() as session,
        session.post(target, data=body, headers=headers) as answer,
    ):
        return answer.status, await answer.read()


def _events(stream: bytes) -> list[dict[str, object]]:
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    out = []
    for message in buffer:
        headers: dict[str, Any] = message.headers  # type: ignore[assignment]
        assert headers[":event-type"] == "chunk"
        chunk = json.loads(message.payload)
        out.append(json.loads(base64.b64decode(chunk["bytes"])))
    return out


async def test_web_identity_credentials_sign_a_bedrock_stream(
    aws: AwsFakes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    identity, creds, bedrock = aws
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("AWS_ROLE_ARN", ROLE)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", creds.url)
    credentials = AwsCredentials()
    await credentials.ensure()
    assert creds.calls == ["AssumeRoleWithWebIdentity"]
    status, stream = await _invoke(
        bedrock, SigV4Signer(credentials, BEDROCK_SERVICE, "us-east-1"), REQUEST
    )
    assert status == 200, (stream, bedrock.refused)
    call = bedrock.calls[-1]
    assert call.model_id == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert call.action == "invoke-with-response-stream"
    assert call.body["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]
    assert call.headers["x-amz-security-token"] == identity.keys[call.access_key].token
    kinds = [e["type"] for e in _events(stream)]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"


async def test_container_credentials_are_refreshed_before_expiry(
    aws: AwsFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, creds, bedrock = aws
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{creds.url}/container-credentials")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", creds.container_token)
    clock = Clock()
    credentials = AwsCredentials(clock=clock)
    await credentials.ensure()
    first = str(credentials.current().access_key)
    await credentials.ensure()  # an hour left: nothing to do
    assert creds.calls == ["container"]
    assert not credentials.due()
    clock.now = identity.keys[first].expires_at - 200  # inside the five-minute margin
    assert credentials.due()
    await credentials.ensure()
    second = credentials.current().access_key
    assert second != first
    assert creds.calls == ["container", "container"]
    signer = SigV4Signer(credentials, BEDROCK_SERVICE, "us-east-1")
    status, _ = await _invoke(bedrock, signer, {**REQUEST, "stream": False})
    assert status == 200
    assert bedrock.calls[-1].access_key == second


async def test_expired_credentials_are_refused_not_used(
    aws: AwsFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, creds, _ = aws
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{creds.url}/container-credentials")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", creds.container_token)
    clock = Clock()
    credentials = AwsCredentials(clock=clock)
    await credentials.ensure()
    clock.now = identity.keys[str(credentials.current().access_key)].expires_at + 1
    with pytest.raises(CredentialMissing, match="expired"):
        credentials.current()


async def test_env_keys_sign_and_a_wrong_secret_is_caught(
    aws: AwsFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, _, bedrock = aws
    key = identity.static("AKIAEXAMPLEKEY000001", "right-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    credentials = AwsCredentials()
    await credentials.ensure()
    status, _ = await _invoke(
        bedrock, SigV4Signer(credentials, BEDROCK_SERVICE, "us-east-1"), REQUEST
    )
    assert status == 403
    assert "does not match" in bedrock.refused[-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "right-secret")
    await credentials.refresh()
    status, _ = await _invoke(
        bedrock, SigV4Signer(credentials, BEDROCK_SERVICE, "us-east-1"), REQUEST
    )
    assert status == 200
    assert not credentials.due()  # long-lived keys have no expiry


async def test_no_credentials_anywhere_is_a_clear_error(aws_env: None) -> None:
    with pytest.raises(CredentialMissing, match="no AWS credentials"):
        await AwsCredentials().refresh()
    with pytest.raises(CredentialMissing, match="no credentials fetched"):
        AwsCredentials().current()


async def test_a_slow_refresh_never_blocks_the_event_loop() -> None:
    release = threading.Event()
    values = iter(["old", "new"])

    def fetch() -> Snapshot[str]:
        value = next(values)
        if value == "new":
            release.wait(10)
        return Snapshot(value, None)

    source: Refreshing[str] = Refreshing("test", fetch)
    await source.refresh()
    task = asyncio.create_task(source.refresh())
    for _ in range(20):  # the loop keeps running while the fetch blocks its thread
        await asyncio.sleep(0)
        assert source.current() == "old"
    release.set()
    await asyncio.wait_for(task, 10)
    assert source.current() == "new"


async def test_a_failed_background_refresh_is_logged_and_the_old_value_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    calls = 0

    def fetch() -> Snapshot[str]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError("metadata server unreachable")
        return Snapshot("v1", clock.now + 3600)

    source: Refreshing[str] = Refreshing("test", fetch, clock=clock)
    assert await source.get() == "v1"
    clock.now += 3500  # inside the margin: this request starts a refresh, keeps v1
    assert await source.get() == "v1"
    for _ in range(500):
        if "credential refresh failed" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "credential refresh failed: OSError: metadata server unreachable" in caplog.text
    assert await source.get() == "v1"  # within RETRY_SECONDS: no second attempt yet
    assert calls == 2


# --------------------------------------------------------------------------- Google


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle(token_lifetime=600)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def _raw_predict(
    fake: FakeGoogle, token: GoogleToken, payload: dict[str, object]
) -> tuple[int, bytes]:
    model = upstreams.vertex_model_id(
        "claude-sonnet-4-5", {"claude-sonnet-4-5": "claude-sonnet-4-5@20250929"}
    )
    request = upstreams.vertex_request("messages", payload, model, "proj", "us-east5")
    headers = {"content-type": "application/json"} | token.headers()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            fake.url + request.path, data=orjson.dumps(request.body), headers=headers
        ) as answer,
    ):
        return answer.status, await answer.read()


async def test_service_account_token_reaches_vertex_and_is_refreshed(
    google: FakeGoogle, tmp_path: Path
) -> None:
    key = tmp_path / "sa.json"
    key.write_text(json.dumps(google.new_key()))
    clock = Clock()
    token = GoogleToken(key_file=key, clock=clock)
    await token.ensure()
    first = token.current()
    status, body = await _raw_predict(google, token, REQUEST)
    assert status == 200, (body, google.refused)
    call = google.calls[-1]
    assert (call.model_id, call.action) == ("claude-sonnet-4-5@20250929", "streamRawPredict")
    assert b"message_stop" in body
    clock.now = google.tokens[first] - 100  # ten-minute tokens: inside the margin soon
    await token.ensure()
    assert token.current() != first
    assert len(google.tokens) == 2


async def test_an_untrusted_service_account_gets_no_token(
    google: FakeGoogle, tmp_path: Path
) -> None:
    info = google.new_key()
    google.accounts.clear()  # the endpoint no longer knows this key
    key = tmp_path / "sa.json"
    key.write_text(json.dumps(info))
    with pytest.raises(Exception, match="invalid_grant"):
        await GoogleToken(key_file=key).refresh()
    assert google.refused
    assert not google.tokens


async def test_vertex_refuses_a_made_up_token(google: FakeGoogle) -> None:
    token = GoogleToken(lambda: Snapshot("ya29.not-issued", None))
    await token.ensure()
    status, _ = await _raw_predict(google, token, REQUEST)
    assert status == 401
    assert google.refused == ["token"]


# --------------------------------------------------------------------------- Foundry / Entra


@pytest.fixture
async def foundry() -> AsyncIterator[FakeFoundry]:
    fake = FakeFoundry("foundry-key")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def _foundry_call(fake: FakeFoundry, headers: dict[str, str]) -> int:
    request = upstreams.foundry_request("messages", "/anthropic")
    body = orjson.dumps({**REQUEST, "stream": False})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            fake.url + request.path,
            data=body,
            headers={"content-type": "application/json", **headers},
        ) as answer,
    ):
        return answer.status


async def test_foundry_api_key_and_a_wrong_one(foundry: FakeFoundry) -> None:
    assert await _foundry_call(foundry, upstreams.foundry_key_headers("foundry-key")) == 200
    assert await _foundry_call(foundry, upstreams.foundry_key_headers("nope")) == 401


async def test_foundry_entra_token_from_a_workload_identity_assertion(
    foundry: FakeFoundry, tmp_path: Path
) -> None:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("k8s-sa-token-1")
    foundry.federated_token = "k8s-sa-token-1"
    clock = Clock()
    fetch = azure.token_fetcher(
        "tenant-1", "app-1", federated_token_file=token_file, authority=foundry.url, clock=clock
    )
    entra = azure.EntraToken(fetch, clock=clock)
    await entra.ensure()
    assert await _foundry_call(foundry, entra.headers()) == 200
    first = entra.current()
    token_file.write_text("k8s-sa-token-2")  # the kubelet rotated the projected token
    foundry.federated_token = "k8s-sa-token-2"
    clock.now += 3600 - 100
    await entra.ensure()
    assert entra.current() != first
    assert await _foundry_call(foundry, entra.headers()) == 200


async def test_foundry_entra_client_secret_and_a_refusal(foundry: FakeFoundry) -> None:
    foundry.client_secret = "s3cret"
    good = azure.token_fetcher(
        "tenant-1", "app-1", client_secret=lambda: "s3cret", authority=foundry.url
    )
    entra = azure.EntraToken(good)
    await entra.ensure()
    assert await _foundry_call(foundry, entra.headers()) == 200
    bad = azure.token_fetcher(
        "tenant-1", "app-1", client_secret=lambda: "wrong", authority=foundry.url
    )
    with pytest.raises(CredentialMissing, match="answered 401: invalid_client"):
        await azure.EntraToken(bad).refresh()


async def test_get_refreshes_ahead_in_the_background_and_waits_only_when_nothing_is_usable() -> (
    None
):
    clock = Clock()
    release = threading.Event()
    fetched: list[str] = []

    def fetch() -> Snapshot[str]:
        value = f"v{len(fetched) + 1}"
        if fetched:
            release.wait(10)
        fetched.append(value)
        return Snapshot(value, clock.now + 3600)

    source: Refreshing[str] = Refreshing("test", fetch, clock=clock)
    assert await source.get() == "v1"  # nothing usable: waited for the first fetch
    clock.now += 3400  # inside the margin
    assert await source.get() == "v1"  # refresh started, this request did not wait
    assert await source.get() == "v1"  # one refresh in flight, not two
    release.set()
    for _ in range(200):
        if fetched == ["v1", "v2"] and source.current() == "v2":
            break
        await asyncio.sleep(0.01)
    assert await source.get() == "v2"
    assert fetched == ["v1", "v2"]


async def test_workload_identity_token_from_the_metadata_server(
    google: FakeGoogle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No key file: Application Default Credentials find the (GKE) metadata server."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud user login
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{google.port}")
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{google.port}")
    token = GoogleToken()
    await token.ensure()
    assert any(path.endswith("/token") for path in google.metadata_calls)
    status, body = await _raw_predict(google, token, {**REQUEST, "stream": False})
    assert status == 200, (body, google.refused)


# --------------------------------------------------------------------------- providers from config


@dataclass(frozen=True)
class Outgoing:
    method: str
    authority: str
    path: str
    body: bytes
    headers: dict[str, str]

    def final_headers(self) -> dict[str, str]:
        return dict(self.headers)


async def test_claude_platform_on_aws_signs_for_its_service_and_names_the_workspace(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = AwsIdentity()
    key = identity.static("AKIAPLATFORM00000001", "platform-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret_key)
    settings = ClaudePlatformAwsSettings(
        kind="claude_platform_aws", region="us-west-2", workspace_id="wrkspc_01abc"
    )
    provider = credential_for(settings, None)
    assert provider is not None
    request = Outgoing(
        "POST",
        "aws-external-anthropic.us-west-2.api.aws",
        "/v1/messages?beta=true",
        b'{"model":"claude-sonnet-4-5"}',
        {"content-type": "application/json"},
    )
    headers = dict(await provider.authorize(request))
    assert headers["anthropic-workspace-id"] == "wrkspc_01abc"
    sent = {"host": request.authority, **request.headers, **headers}
    verify_sigv4(
        identity,
        service="aws-external-anthropic",
        region="us-west-2",
        method="POST",
        raw_path=request.path,
        headers=sent,
        body=request.body,
    )
    with pytest.raises(SignatureError):
        verify_sigv4(
            identity,
            service="aws-external-anthropic",
            region="us-west-2",
            method="POST",
            raw_path=request.path,
            headers=sent,
            body=request.body + b" ",
        )


async def test_api_key_providers_from_config() -> None:
    foundry = credential_for(
        FoundrySettings(kind="foundry"), CredentialSource.model_validate({"value": "fk"})
    )
    request = Outgoing("POST", "res.services.ai.azure.com", "/anthropic/v1/messages", b"{}", {})
    assert foundry is not None
    assert dict(await foundry.authorize(request)) == {"x-api-key": "fk", "api-key": "fk"}
    keyed = ClaudePlatformAwsSettings(kind="claude_platform_aws", region="us-east-1", sigv4=False)
    platform = credential_for(keyed, CredentialSource.model_validate({"value": "ak"}))
    assert platform is not None
    # No workspace_id configured: nothing added, the caller's anthropic-workspace-id passes.
    assert dict(await platform.authorize(request)) == {"x-api-key": "ak"}
    assert credential_for(FoundrySettings(kind="foundry"), None) is None


def test_cloud_settings_are_validated_at_start(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="AWS region"):
        BedrockSettings(kind="bedrock", region="moon-1")
    with pytest.raises(ValidationError, match="Bedrock id"):
        BedrockSettings(kind="bedrock", region="us-east-1", models={"a": "claude-sonnet-4-5"})
    with pytest.raises(ValidationError, match="inference profile prefix"):
        BedrockSettings(kind="bedrock", region="us-east-1", inference_profile="US!")
    with pytest.raises(ValidationError, match="does not exist"):
        VertexSettings(
            kind="vertex", project="my-project", region="us-east5", key_file=tmp_path / "x"
        )
    with pytest.raises(ValidationError, match="Vertex model id"):
        VertexSettings(kind="vertex", project="my-project", region="us-east5", models={"a": "b c"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        VertexSettings.model_validate(
            {"kind": "vertex", "project": "my-project", "region": "global", "x": 1}
        )


async def test_a_failed_fetch_with_nothing_usable_is_credential_missing() -> None:
    def fetch() -> Snapshot[str]:
        raise OSError("connection refused")

    source: Refreshing[str] = Refreshing("test", fetch)
    with pytest.raises(CredentialMissing, match="fetching credentials failed"):
        await source.get()


async def test_warm_fetches_at_start_and_reports_a_broken_identity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from extproc.cloud.providers import BearerProvider

    good = BearerProvider(Refreshing("good", lambda: Snapshot("t", None)), "a token")
    await good.warm("vertex")
    assert good.token.usable()

    def broken() -> Snapshot[str]:
        raise OSError("metadata server unreachable")

    bad = BearerProvider(Refreshing("bad", broken), "a token")
    await bad.warm("vertex")
    assert not bad.token.usable()
    assert "provider vertex: a token not available yet: OSError" in caplog.text


async def test_a_burst_of_cold_requests_makes_one_fetch() -> None:
    release = threading.Event()
    fetches = 0

    def fetch() -> Snapshot[str]:
        nonlocal fetches
        fetches += 1
        release.wait(10)
        return Snapshot("v1", None)

    source: Refreshing[str] = Refreshing("test", fetch)
    waiting = [asyncio.create_task(source.get()) for _ in range(20)]
    for _ in range(500):  # until the first fetch is under way (the others queue behind it)
        if fetches:
            break
        await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*waiting), 10) == ["v1"] * 20
    assert fetches == 1
