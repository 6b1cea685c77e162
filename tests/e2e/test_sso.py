"""Sign in with SSO the way Claude Code does, through real Envoy, a real redis-server and a
strict loopback OIDC provider; then use, refresh, revoke; group policy, managed settings,
the OTLP relay, and bad input on every unauthenticated endpoint."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from extproc.credentials import CredentialSource
from extproc.policies.auth import hash_key, new_key
from extproc.signin.config import OidcConfig
from extproc.signin.managed import checksum
from extproc.signin.oidc import LoginStart, OidcClient, OidcError
from extproc.signin.tokens import generate_pem
from tests import oidc_issuer
from tests.claude_cli import claude_env, claude_path
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.oidc_issuer import Issuer, User
from tests.redis_server import RedisServer

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
OPUS_SETTINGS = {
    "availableModels": ["claude-opus-4-8", "claude-sonnet-4-6"],
    "env": {"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"},
    "permissions": {"deny": ["Bash(rm -rf *)"]},
}
AGENT = {"user-agent": "claude-code/2.1.197"}
CI_KEY = new_key("ci-bot")


class Collector:
    """An OTLP/HTTP collector on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                collector.received.append((self.path, self.headers["content-type"], body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 10) -> list[tuple[str, str, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    with oidc_issuer.running() as running:
        yield running


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.server.shutdown()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def sso_config(fake: FakeProvider, issuer: Issuer, store: str, **sso: Any) -> dict[str, Any]:
    config = gateway_config(fake.url, store=store)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held-by-gateway"}
    config["auth"] = {"required": True, "cache_seconds": 1}
    config["teams"] = {"platform": {"models": ["claude-*"]}, "eng": {}}
    config["tiers"] = {"thrifty": {"map": {"claude-opus-*": "claude-sonnet-4-6"}}}
    config["sso"] = {
        "oidc": {
            "issuer": issuer.url,
            "client_id": oidc_issuer.CLIENT_ID,
            "client_secret": {"value": oidc_issuer.CLIENT_SECRET},
        },
        "signing_key": {"value": generate_pem()},
        "poll_interval_seconds": 1,
        "requests_per_minute": 100_000,  # every test comes from 127.0.0.1
        "groups": [
            {"group": "opus-devs", "team": "platform", "settings": OPUS_SETTINGS},
            {"group": "eng", "team": "eng", "models": ["claude-sonnet-*"]},
            {"group": "interns", "tier": "thrifty"},
        ],
        **sso,
    }
    return config


@pytest.fixture(scope="module")
def replicas(
    fake: FakeProvider, issuer: Issuer, redis: RedisServer, collector: Collector
) -> Iterator[list[Stack]]:
    """Two gateways (Envoy + ext_proc each) sharing one redis-server and one signing key."""
    config = sso_config(fake, issuer, redis.url)
    config["otlp_relay"] = {"endpoint": collector.url}
    config["auth"]["keys"] = [{"id": "ci-bot", "hash": hash_key(CI_KEY), "user": "ci-bot"}]
    config["budgets"] = {"rules": [{"scope": "user", "id": "*", "window": "daily", "usd": 5}]}
    stacks: list[Stack] = []
    try:
        for _ in range(2):
            ports = gateway_config(fake.url)  # fresh free ports for this replica
            keys = ("listen", "grpc_listen", "metrics_listen", "envoy")
            stack = Stack({**config, **{key: ports[key] for key in keys}})
            issuer.redirect_uris.add(f"{stack.url}/device/callback")
            stacks.append(stack.start())
        yield stacks
    finally:
        for stack in stacks:
            stack.close()


@pytest.fixture(scope="module")
def gateway(replicas: list[Stack]) -> Stack:
    return replicas[0]


# -- the developer's side: what Claude Code and the browser do ------------------------------


def discover(base: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/.well-known/oauth-authorization-server", headers=AGENT)
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def start_device(base: str, **form: str) -> dict[str, Any]:
    metadata = discover(base)
    assert metadata["device_authorization_endpoint"].startswith(base)
    answer = httpx.post(
        metadata["device_authorization_endpoint"], data={"surface": "claude_code", **form}
    )
    assert answer.status_code == 200, answer.text
    device: dict[str, Any] = answer.json()
    return device


def approve_in_browser(device: dict[str, Any]) -> httpx.Response:
    """Open verification_uri_complete, confirm the code, sign in at the IdP, come back."""
    form, cookie = page_form(device)
    confirmed = httpx.post(device["verification_uri"], data=form, headers={"cookie": cookie})
    assert confirmed.status_code == 303, confirmed.text
    at_idp = httpx.get(confirmed.headers["location"])
    assert at_idp.status_code == 302, at_idp.text
    back = at_idp.headers["location"]
    assert httpx.get(back).status_code == 400  # another browser cannot finish this login
    return httpx.get(back, headers={"cookie": cookie})


def poll(base: str, device_code: str, **form: str) -> httpx.Response:
    data = {"grant_type": DEVICE_GRANT, "device_code": device_code, **form}
    return httpx.post(discover(base)["token_endpoint"], data=data, headers=AGENT)


def sign_in(base: str, issuer: Issuer, user: User) -> dict[str, Any]:
    device = start_device(base)
    issuer.next_user = user
    assert approve_in_browser(device).status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = poll(base, device["device_code"])
        if answer.status_code == 200:
            tokens: dict[str, Any] = answer.json()
            return tokens
        assert answer.json()["error"] in ("authorization_pending", "slow_down")
        time.sleep(device["interval"])
    raise AssertionError("the device code was never approved")


def refresh(base: str, refresh_token: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    return httpx.post(f"{base}/oauth/token", data=data, headers=AGENT)


def messages(base: str, token: str, model: str = "claude-sonnet-4-6") -> httpx.Response:
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}
    return httpx.post(f"{base}/v1/messages", json=body, headers=headers, timeout=20)


OPUS_DEV = User("ana@example.com", ["staff", "opus-devs"])
SONNET_DEV = User("bo@example.com", ["eng"])


# -- the tests --------------------------------------------------------------------------------


def test_discovery_advertises_same_origin_endpoints(gateway: Stack) -> None:
    metadata = discover(gateway.url)
    assert metadata["issuer"] == gateway.url
    for name in ("device_authorization_endpoint", "token_endpoint", "revocation_endpoint"):
        assert metadata[name].startswith(gateway.url + "/oauth/")
    assert DEVICE_GRANT in metadata["grant_types_supported"]
    assert "authorization_endpoint" not in metadata


def test_device_codes_are_long_and_user_codes_base20(gateway: Stack) -> None:
    device = start_device(gateway.url)
    assert len(device["device_code"]) >= 43  # 256 bits in base64url
    assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", device["user_code"])
    assert device["verification_uri"] == f"{gateway.url}/device"
    page = httpx.get(device["verification_uri_complete"]).text
    assert "<form" in page
    assert "<script" not in page  # nothing submits the pre-filled code for the user


def test_sign_in_then_claude_code_runs_then_refresh_then_revoke(
    replicas: list[Stack], issuer: Issuer, received: FakeProvider
) -> None:
    gateway, other = replicas
    tokens = sign_in(gateway.url, issuer, OPUS_DEV)
    assert tokens["token_type"] == "Bearer"
    assert tokens["email"] == OPUS_DEV.email
    run_claude(gateway, tokens["access_token"])
    assert received.received, "Claude Code reached the provider through the gateway"
    for request in received.received:
        assert request.headers.get("x-api-key") == "sk-held-by-gateway"
        assert tokens["access_token"] not in str(request.headers)
    record = gateway.audit_records(wait_for=1)[-1]
    assert (record["identity"], record["user"], record["team"]) == (
        "sso",
        OPUS_DEV.email,
        "platform",
    )

    renewed = refresh(gateway.url, tokens["refresh_token"])
    assert renewed.status_code == 200, renewed.text
    fresh = renewed.json()
    for replica in replicas:  # one signing key: every replica takes the token
        assert messages(replica.url, fresh["access_token"]).status_code == 200
    replayed = refresh(gateway.url, tokens["refresh_token"])
    assert (replayed.status_code, replayed.json()["error"]) == (401, "invalid_grant")

    revoke_user(gateway, OPUS_DEV.email)
    started = time.monotonic()
    wait_for_status(other.url, fresh["access_token"], 401, limit=5)
    refused = wait_for_status(gateway.url, fresh["access_token"], 401, limit=5)
    assert time.monotonic() - started < 4  # auth.cache_seconds is 1 here
    assert refused.headers["x-should-retry"] == "false"
    assert refused.json()["error"]["type"] == "authentication_error"
    assert "revoked" in refused.json()["error"]["message"]
    again = refresh(gateway.url, fresh["refresh_token"])
    assert (again.status_code, again.json()["error"]) == (401, "invalid_grant")


def run_claude(gateway: Stack, token: str) -> None:
    cli = claude_path()
    if cli is None:
        pytest.skip("the Claude Code CLI is not installed (scripts/test installs it)")
    with tempfile.TemporaryDirectory() as home:
        env = claude_env(Path(home), ANTHROPIC_BASE_URL=gateway.url, ANTHROPIC_AUTH_TOKEN=token)
        command = [cli, "-p", "say hi", "--model", "claude-sonnet-4-6"]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stdout + done.stderr


def revoke_user(gateway: Stack, user: str) -> None:
    command = [sys.executable, "-m", "extproc", "sso", "--config", str(gateway.config_path)]
    done = subprocess.run(
        [*command, "revoke", user], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "within 1 s" in done.stdout


def wait_for_status(base: str, token: str, status: int, limit: float) -> httpx.Response:
    deadline = time.monotonic() + limit
    answer = messages(base, token)
    while answer.status_code != status and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = messages(base, token)
    assert answer.status_code == status, answer.text
    return answer


def test_sso_and_key_requests_are_audited_and_budgeted_alike(
    gateway: Stack, issuer: Issuer
) -> None:
    token = sign_in(gateway.url, issuer, SONNET_DEV)["access_token"]
    by_sso = messages(gateway.url, token)
    by_key = messages(gateway.url, CI_KEY)
    assert by_sso.status_code == by_key.status_code == 200
    ids = {by_sso.headers["x-gateway-request-id"], by_key.headers["x-gateway-request-id"]}
    records = [r for r in gateway.audit_records(wait_for=2) if r["request_id"] in ids]
    deadline = time.monotonic() + 5
    while len(records) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        records = [r for r in gateway.audit_records() if r["request_id"] in ids]
    sso_record, key_record = sorted(records, key=lambda r: r["identity"] != "sso")
    assert sso_record["identity"] == "sso"
    assert key_record["identity"] == "key"
    assert sso_record["scopes"]["user"] == SONNET_DEV.email
    assert key_record["scopes"]["user"] == "ci-bot"
    assert sso_record["cost_usd"] is not None
    assert key_record["cost_usd"] is not None
    quota = httpx.get(
        f"{gateway.url}/v1/gateway/quota", headers={"authorization": f"Bearer {token}"}
    )
    assert quota.status_code == 200, quota.text
    assert SONNET_DEV.email in quota.text


def test_group_policy_opus_for_one_group_sonnet_only_for_the_other(
    gateway: Stack, issuer: Issuer, received: FakeProvider
) -> None:
    opus = sign_in(gateway.url, issuer, User("cy@example.com", ["opus-devs"]))["access_token"]
    sonnet = sign_in(gateway.url, issuer, SONNET_DEV)["access_token"]
    assert messages(gateway.url, opus, "claude-opus-4-8").status_code == 200
    refused = messages(gateway.url, sonnet, "claude-opus-4-8")
    assert refused.status_code == 403
    assert "claude-sonnet-*" in refused.json()["error"]["message"]
    assert messages(gateway.url, sonnet, "claude-sonnet-4-6").status_code == 200
    intern = sign_in(gateway.url, issuer, User("ivy@example.com", ["interns"]))["access_token"]
    mapped = messages(gateway.url, intern, "claude-opus-4-8")  # the group's tier maps it
    assert mapped.status_code == 200
    assert received.received[-1].json()["model"] == "claude-sonnet-4-6"


def test_user_in_no_group_is_refused_at_sign_in(gateway: Stack, issuer: Issuer) -> None:
    device = start_device(gateway.url)
    issuer.next_user = User("eve@example.com", ["contractors"])
    page = approve_in_browser(device)
    assert page.status_code == 403
    answer = poll(gateway.url, device["device_code"])
    assert answer.json()["error"] == "access_denied"


def test_managed_settings_200_304_404(gateway: Stack, issuer: Issuer) -> None:
    opus = sign_in(gateway.url, issuer, User("di@example.com", ["opus-devs"]))["access_token"]
    sonnet = sign_in(gateway.url, issuer, SONNET_DEV)["access_token"]
    url = f"{gateway.url}/managed/settings"
    first = httpx.get(url, headers={"authorization": f"Bearer {opus}"})
    assert first.status_code == 200
    document = first.json()
    assert document["settings"] == OPUS_SETTINGS
    assert document["checksum"] == checksum(OPUS_SETTINGS)
    assert first.headers["etag"] == f'"{document["checksum"]}"'
    headers = {"authorization": f"Bearer {opus}", "if-none-match": first.headers["etag"]}
    assert httpx.get(url, headers=headers).status_code == 304
    headers["if-none-match"] = '"sha256:stale"'
    assert httpx.get(url, headers=headers).status_code == 200
    assert httpx.get(url, headers={"authorization": f"Bearer {sonnet}"}).status_code == 404
    assert httpx.get(url).status_code == 401


def test_otlp_relay_stamps_the_user_and_never_404s(
    gateway: Stack, issuer: Issuer, collector: Collector
) -> None:
    token = sign_in(gateway.url, issuer, SONNET_DEV)["access_token"]
    export = {"resourceMetrics": [{"resource": {"attributes": []}, "scopeMetrics": []}]}
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    for signal in ("metrics", "logs", "traces"):
        body = orjson.dumps(export) if signal == "metrics" else b"{}"
        answer = httpx.post(f"{gateway.url}/v1/{signal}", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
    received = collector.wait(3)
    _, content_type, body = next(r for r in received if r[0] == "/v1/metrics")
    attributes = orjson.loads(body)["resourceMetrics"][0]["resource"]["attributes"]
    assert {"key": "enduser.id", "value": {"stringValue": SONNET_DEV.email}} in attributes
    assert content_type == "application/json"


# -- bad input on the unauthenticated endpoints ---------------------------------------------


def test_unknown_and_replayed_device_codes(gateway: Stack, issuer: Issuer) -> None:
    unknown = poll(gateway.url, "not-a-device-code")
    assert (unknown.status_code, unknown.json()["error"]) == (400, "invalid_grant")
    device = start_device(gateway.url)
    issuer.next_user = SONNET_DEV
    approve_in_browser(device)
    time.sleep(device["interval"])
    assert poll(gateway.url, device["device_code"]).status_code == 200
    replay = poll(gateway.url, device["device_code"])
    assert (replay.status_code, replay.json()["error"]) == (400, "invalid_grant")
    assert "used" in replay.json()["error_description"]


def test_wrong_client_and_slow_down(gateway: Stack) -> None:
    device = start_device(gateway.url, client_id="claude-code")
    other = poll(gateway.url, device["device_code"], client_id="someone-else")
    assert (other.status_code, other.json()["error"]) == (400, "invalid_grant")
    first = poll(gateway.url, device["device_code"], client_id="claude-code")
    assert first.json()["error"] == "authorization_pending"
    second = poll(gateway.url, device["device_code"], client_id="claude-code")
    assert (second.status_code, second.json()["error"]) == (400, "slow_down")


@pytest.mark.parametrize(
    "path", ["/oauth/device_authorization", "/oauth/token", "/oauth/revoke", "/device"]
)
def test_oversized_form_bodies_are_413(gateway: Stack, path: str) -> None:
    answer = httpx.post(
        f"{gateway.url}{path}",
        content=b"a=" + b"x" * 20_000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 413
    assert answer.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "password", "username": "x"}, "unsupported_grant_type"),
        ({"grant_type": DEVICE_GRANT}, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "nope"}, "invalid_grant"),
    ],
)
def test_token_endpoint_bad_input(gateway: Stack, data: dict[str, str], error: str) -> None:
    answer = httpx.post(f"{gateway.url}/oauth/token", data=data)
    assert answer.status_code in (400, 401)
    assert answer.json()["error"] == error
    assert answer.headers["cache-control"] == "no-store"


def test_verification_page_bad_input(gateway: Stack) -> None:
    no_csrf = httpx.post(f"{gateway.url}/device", data={"user_code": "BBBB-CCCC"})
    assert no_csrf.status_code == 403
    page = httpx.get(f"{gateway.url}/device")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    cookie = page.headers["set-cookie"].split(";", 1)[0]
    form = {"user_code": "BBBB-CCCC", "csrf": csrf.group(1)}
    unknown = httpx.post(f"{gateway.url}/device", data=form, headers={"cookie": cookie})
    assert unknown.status_code == 400
    assert "unknown" in unknown.text.lower()
    stale = httpx.get(f"{gateway.url}/device/callback?state=forged&code=x")
    assert stale.status_code == 400
    assert httpx.put(f"{gateway.url}/oauth/token").status_code == 405


def test_a_forged_or_foreign_token_is_refused(gateway: Stack, issuer: Issuer) -> None:
    token = sign_in(gateway.url, issuer, SONNET_DEV)["access_token"]
    header, payload, _ = token.split(".")
    forged = messages(gateway.url, f"{header}.{payload}.{'A' * 86}")
    assert forged.status_code == 401
    assert forged.headers["x-should-retry"] == "false"
    foreign = messages(gateway.url, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJldmUifQ.")
    assert foreign.status_code == 401


# -- the gateway as the IdP's client: what a strict IdP refuses -----------------------------


def _oidc_client(issuer: Issuer, secret: str = oidc_issuer.CLIENT_SECRET) -> OidcClient:
    config = OidcConfig(
        issuer=issuer.url,
        client_id=oidc_issuer.CLIENT_ID,
        client_secret=CredentialSource(value=SecretStr(secret)),
    )
    return OidcClient(config, lambda: secret)


async def _code_for(client: OidcClient, login: LoginStart, redirect: str) -> str:
    async with httpx.AsyncClient() as browser:
        answer = await browser.get(await client.authorize_url(login, redirect))
    assert answer.status_code == 302, answer.text
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(answer.headers["location"]).query))
    assert query["state"] == login.state
    return query["code"]


async def test_idp_login_checks_secret_pkce_redirect_and_nonce(issuer: Issuer) -> None:
    redirect = "https://gw.test/device/callback"
    issuer.redirect_uris.add(redirect)
    issuer.next_user = User("fay@example.com", ["eng"])
    client = _oidc_client(issuer)
    login = LoginStart.new()
    user = await client.finish(await _code_for(client, login, redirect), login, redirect)
    assert (user.user, user.groups) == ("fay@example.com", ("eng",))

    wrong_secret = _oidc_client(issuer, "guessed")
    login = LoginStart.new()
    with pytest.raises(OidcError, match="401"):
        await wrong_secret.finish(await _code_for(client, login, redirect), login, redirect)
    login = LoginStart.new()
    code = await _code_for(client, login, redirect)
    other_verifier = LoginStart(login.state, login.nonce, LoginStart.new().verifier)
    with pytest.raises(OidcError, match="invalid_grant"):
        await client.finish(code, other_verifier, redirect)
    login = LoginStart.new()
    code = await _code_for(client, login, redirect)
    with pytest.raises(OidcError, match="nonce"):
        await client.finish(code, LoginStart(login.state, "forged", login.verifier), redirect)
    with pytest.raises(AssertionError):  # an unregistered redirect URI never gets a code
        await _code_for(client, LoginStart.new(), "https://evil.test/cb")


def test_sign_out_revokes_the_session(gateway: Stack, issuer: Issuer) -> None:
    tokens = sign_in(gateway.url, issuer, User("gil@example.com", ["eng"]))
    assert messages(gateway.url, tokens["access_token"]).status_code == 200
    endpoint = discover(gateway.url)["revocation_endpoint"]
    for form in (
        {"token": tokens["access_token"]},
        {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        {"token": "not-a-token"},
    ):
        assert httpx.post(endpoint, data=form, headers=AGENT).status_code == 200
    refused = wait_for_status(gateway.url, tokens["access_token"], 401, limit=5)
    assert "revoked" in refused.json()["error"]["message"]
    assert refresh(gateway.url, tokens["refresh_token"]).status_code == 401


def page_form(device: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The verification page's form for this device code, and its CSRF cookie."""
    page = httpx.get(device["verification_uri_complete"])
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    cookie = page.headers["set-cookie"].split(";", 1)[0]
    return {"user_code": device["user_code"], "csrf": csrf.group(1)}, cookie


def test_denied_at_the_page_or_at_the_idp(gateway: Stack) -> None:
    device = start_device(gateway.url)
    form, cookie = page_form(device)
    denied = httpx.post(f"{gateway.url}/device/deny", data=form, headers={"cookie": cookie})
    assert denied.status_code == 200
    assert poll(gateway.url, device["device_code"]).json()["error"] == "access_denied"

    device = start_device(gateway.url)
    form, cookie = page_form(device)
    confirmed = httpx.post(device["verification_uri"], data=form, headers={"cookie": cookie})
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(confirmed.headers["location"]).query))
    back = httpx.get(
        f"{gateway.url}/device/callback",
        params={"state": state["state"], "error": "access_denied"},
        headers={"cookie": cookie},
    )
    assert back.status_code == 403
    assert poll(gateway.url, device["device_code"]).json()["error"] == "access_denied"
