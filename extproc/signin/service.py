"""The Claude Code gateway sign-in protocol, answered by the ext_proc server itself.

Envoy sends every request through the ext_proc filter; for these paths the server
answers at once (an ImmediateResponse), so sign-in needs no second listener, service
or Envoy cluster:

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata
    POST /oauth/device_authorization               RFC 8628 §3.1-3.2
    POST /oauth/token                              device_code and refresh_token grants
    POST /oauth/revoke                             RFC 7009 (sign-out)
    GET  /device[?user_code=]   POST /device        the verification page -> the IdP
    POST /device/deny           GET /device/callback   (authorization code + PKCE)

The unauthenticated ones share a per-IP rate limit (`sso.requests_per_minute`).
Bearer endpoints (`/managed/settings`, the OTLP relay) are authenticated like model
requests and answered in `extproc.stream`.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from extproc.decisions import Respond
from extproc.errors import Unauthorized
from extproc.policies.auth import Identity
from extproc.signin import flow, pages
from extproc.signin.config import SsoConfig
from extproc.signin.oidc import LoginStart, OidcClient, OidcError
from extproc.signin.policy import identity_of, policy_for
from extproc.signin.tokens import InvalidToken, Revocations, Session, TokenSigner, add_revocation
from extproc.store import Gcra, Store, StoreError

log = logging.getLogger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
PATHS = frozenset(
    {
        "/.well-known/oauth-authorization-server",
        "/oauth/device_authorization",
        "/oauth/token",
        "/oauth/revoke",
        "/device",
        "/device/deny",
        "/device/callback",
    }
)
_POST = frozenset({"/oauth/device_authorization", "/oauth/token", "/oauth/revoke", "/device/deny"})
CSRF_COOKIE = "extproc_device_csrf"
_NO_STORE = (("cache-control", "no-store"), ("pragma", "no-cache"))


def oauth_json(
    status: int, body: Mapping[str, Any], extra: tuple[tuple[str, str], ...] = ()
) -> Respond:
    headers = (("content-type", "application/json"), *_NO_STORE, *extra)
    return Respond(status, orjson.dumps(body), headers, "extproc_sso")


def oauth_error(error: flow.GrantError, extra: tuple[tuple[str, str], ...] = ()) -> Respond:
    body = {"error": error.error, "error_description": error.description}
    return oauth_json(error.status, body, extra)


def client_ip(headers: Mapping[str, str]) -> str:
    """The caller's address as the edge Envoy saw it (the last X-Forwarded-For entry, which
    Envoy appends with `use_remote_address: true`)."""
    forwarded = headers.get("x-forwarded-for", "")
    return forwarded.rsplit(",", 1)[-1].strip() or headers.get(
        "x-envoy-external-address", "unknown"
    )


def parse_form(body: bytes, limit: int) -> dict[str, str]:
    if len(body) > limit:
        raise flow.GrantError("invalid_request", f"form body over {limit} bytes", 413)
    try:
        pairs = urllib.parse.parse_qsl(body.decode(), max_num_fields=64, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise flow.GrantError("invalid_request", "the body is not a valid form") from exc
    return dict(pairs)


def browser_token(headers: Mapping[str, str]) -> str:
    """The verification page's cookie: it ties a form and a login to one browser."""
    cookies = headers.get("cookie", "").split(";")
    pairs = dict(part.strip().split("=", 1) for part in cookies if "=" in part)
    return pairs.get(CSRF_COOKIE, "")


def csrf_ok(headers: Mapping[str, str], form: Mapping[str, str]) -> bool:
    """The double-submit check: the form's token equals the page's cookie."""
    expected = browser_token(headers)
    return bool(expected) and secrets.compare_digest(expected, form.get("csrf", ""))


class SignIn:
    def __init__(
        self,
        config: SsoConfig,
        store: Store,
        signer: TokenSigner,
        oidc: OidcClient,
        cache_seconds: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.signer = signer
        self.oidc = oidc
        self.clock = clock
        self.flow = flow.DeviceFlow(
            store,
            config.device_code_seconds,
            config.poll_interval_seconds,
            config.refresh_token_seconds,
        )
        self.revocations = Revocations(store, cache_seconds, monotonic)

    # -- the hot path ---------------------------------------------------------------------

    async def authenticate(self, token: str) -> Identity:
        """A bearer access token as an identity; `Unauthorized` otherwise (rendered with
        `x-should-retry: false`, so Claude Code asks to sign in again at once)."""
        try:
            claims = self.signer.check(token)
        except InvalidToken as exc:
            raise Unauthorized(str(exc), reason="invalid_token") from exc
        if await self.revocations.revoked(claims.session, claims.issued_at):
            raise Unauthorized(
                "this sign-in was revoked; run /login again",
                reason="token_revoked",
            )
        chosen = policy_for(self.config, claims.session.groups)
        if chosen is None:
            raise Unauthorized(
                f"user {claims.session.user!r} is in no group allowed to use this gateway",
                reason="no_group_policy",
            )
        return identity_of(claims.session, *chosen)

    # -- the unauthenticated endpoints -----------------------------------------------------

    def too_large(self) -> Respond:
        limit = self.config.max_form_bytes
        return oauth_error(flow.GrantError("invalid_request", f"form body over {limit} bytes", 413))

    @staticmethod
    def serves(path: str) -> bool:
        return path.split("?", 1)[0] in PATHS

    @staticmethod
    def needs_body(method: str, path: str) -> bool:
        return method == "POST" and (path.split("?", 1)[0] in _POST or path.startswith("/device"))

    async def handle(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> Respond:
        path, _, query = raw_path.partition("?")
        limited = await self._rate_limited(client_ip(headers))
        if limited is not None:
            return limited
        try:
            return await self._dispatch(method, path, query, headers, body)
        except flow.GrantError as error:
            return oauth_error(error)
        except StoreError:
            log.exception("sign-in: the store is unreachable")
            return oauth_error(
                flow.GrantError("temporarily_unavailable", "the store is unreachable", 503)
            )

    async def _dispatch(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Respond:
        base = self._base(headers)
        if path == "/.well-known/oauth-authorization-server":
            return self._allow(method, "GET") or self.metadata(base)
        if path == "/device/callback":
            return self._allow(method, "GET") or await self.callback(query, headers, base)
        if path == "/device":
            if method == "GET":
                return self.verification_page(query, base)
            return self._allow(method, "POST") or await self.verify(headers, body, base)
        allowed = self._allow(method, "POST")
        if allowed is not None:
            return allowed
        form = parse_form(body, self.config.max_form_bytes)
        if path == "/oauth/device_authorization":
            return await self.device_authorization(form, base)
        if path == "/oauth/token":
            return await self.token(form)
        if path == "/oauth/revoke":
            return await self.revoke(form)
        return await self.deny(headers, form)

    @staticmethod
    def _allow(method: str, allowed: str) -> Respond | None:
        if method == allowed:
            return None
        body = {"error": "invalid_request", "error_description": f"use {allowed}"}
        return oauth_json(405, body, (("allow", allowed),))

    def _base(self, headers: Mapping[str, str]) -> str:
        if self.config.public_url is not None:
            return self.config.public_url
        scheme = headers.get(":scheme") or headers.get("x-forwarded-proto") or "http"
        return f"{scheme}://{headers.get(':authority') or headers.get('host', 'localhost')}"

    async def _rate_limited(self, ip: str) -> Respond | None:
        rate = self.config.requests_per_minute
        item = Gcra(f"extproc:sso:ip:{{{ip}}}", rate, 60.0, rate, 1)
        try:
            (state,) = await self.store.rate([item])
        except StoreError:
            return None  # like rate_limits.fail_open: a store outage must not stop sign-in
        if state.allowed:
            return None
        retry = str(max(1, int(state.retry_after + 0.999)))
        error = flow.GrantError("slow_down", "too many sign-in requests from this address", 429)
        return oauth_error(error, (("retry-after", retry),))

    def metadata(self, base: str) -> Respond:
        document = {
            "issuer": base,
            "device_authorization_endpoint": f"{base}/oauth/device_authorization",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "grant_types_supported": [DEVICE_GRANT, "refresh_token"],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
        }
        return oauth_json(200, document)

    async def device_authorization(self, form: Mapping[str, str], base: str) -> Respond:
        device_code, user_code = await self.flow.start(form.get("client_id"), self.clock())
        return oauth_json(
            200,
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": f"{base}/device",
                "verification_uri_complete": f"{base}/device?user_code={user_code}",
                "expires_in": self.config.device_code_seconds,
                "interval": self.config.poll_interval_seconds,
            },
        )

    async def token(self, form: Mapping[str, str]) -> Respond:
        grant = form.get("grant_type")
        client_id = form.get("client_id")
        if grant == DEVICE_GRANT:
            code = form.get("device_code")
            if not code:
                raise flow.GrantError("invalid_request", "device_code is missing")
            issued = await self.flow.poll(code, client_id, self.clock())
            return self._tokens(issued)
        if grant == "refresh_token":
            return await self._refresh(form.get("refresh_token") or "", client_id)
        if not grant:
            raise flow.GrantError("invalid_request", "grant_type is missing")
        raise flow.GrantError(
            "unsupported_grant_type", f"grant_type {grant[:64]!r} is not supported"
        )

    async def _refresh(self, refresh: str, client_id: str | None) -> Respond:
        session, issued_at = await self.flow.take_refresh(refresh, client_id)
        # The deprovisioning hook: a revoked user, or one whose groups no longer match a
        # policy, is refused here and Claude Code sends them back to /login.
        if await self.revocations.revoked(session, issued_at):
            raise flow.GrantError("invalid_grant", "this sign-in was revoked", 401)
        if policy_for(self.config, session.groups) is None:
            raise flow.GrantError("invalid_grant", "no group policy allows this user", 401)
        return self._tokens(await self.flow.issue(session, client_id, self.clock()))

    def _tokens(self, issued: flow.Issued) -> Respond:
        body: dict[str, Any] = {
            "access_token": self.signer.mint(issued.session),
            "token_type": "Bearer",
            "expires_in": self.signer.lifetime,
            "refresh_token": issued.refresh_token,
        }
        if issued.session.email:
            body["email"] = issued.session.email
        return oauth_json(200, body)

    async def revoke(self, form: Mapping[str, str]) -> Respond:
        token = form.get("token", "")
        try:
            claims = self.signer.check(token)
        except InvalidToken:
            await self.flow.sign_out(token or None, None)
        else:
            await add_revocation(self.store, "s:" + claims.session.sid, self.clock(), self._keep)
            await self.flow.sign_out(None, claims.session.sid)
        return oauth_json(200, {})

    # -- the verification page -------------------------------------------------------------

    def verification_page(self, query: str, base: str) -> Respond:
        user_code = dict(urllib.parse.parse_qsl(query)).get("user_code", "")[:32]
        csrf = secrets.token_urlsafe(24)
        secure = "; Secure" if base.startswith("https:") else ""
        cookie = f"{CSRF_COOKIE}={csrf}; Path=/device; HttpOnly; SameSite=Lax; Max-Age=900{secure}"
        return pages.code_form(user_code, csrf, cookie)

    async def verify(self, headers: Mapping[str, str], body: bytes, base: str) -> Respond:
        form = parse_form(body, self.config.max_form_bytes)
        if not csrf_ok(headers, form):
            return pages.message(
                403, "Sign-in refused", "The form is stale; reload the sign-in page."
            )
        found = await self.flow.by_user_code(form.get("user_code", ""), self.clock())
        if found is None:
            return pages.message(400, "Unknown code", "That code is unknown, used or expired.")
        login = LoginStart.new()
        record = {
            "device": found[0],
            "nonce": login.nonce,
            "verifier": login.verifier,
            "browser": form["csrf"],
        }
        await self.store.set(flow.LOGIN + login.state, orjson.dumps(record), 600)
        try:
            url = await self.oidc.authorize_url(login, f"{base}/device/callback")
        except OidcError as exc:
            return pages.message(502, "Identity provider unavailable", str(exc))
        return Respond(303, b"", (("location", url), *_NO_STORE), "extproc_sso")

    async def deny(self, headers: Mapping[str, str], form: Mapping[str, str]) -> Respond:
        if not csrf_ok(headers, form):
            return pages.message(
                403, "Sign-in refused", "The form is stale; reload the sign-in page."
            )
        found = await self.flow.by_user_code(form.get("user_code", ""), self.clock())
        if found is not None:
            await self.flow.decide(*found, None, self.clock())
        return pages.message(200, "Sign-in denied", "The device was not signed in.")

    async def callback(self, query: str, headers: Mapping[str, str], base: str) -> Respond:
        """The IdP sent the browser back: finish the login it started, approve the device."""
        params = dict(urllib.parse.parse_qsl(query))
        record = await self._take_login(params.get("state", "")[:128], browser_token(headers))
        device = await self._device(record["device"]) if record is not None else None
        if record is None or device is None:
            return pages.message(400, "Sign-in expired", "Start again from your terminal.")
        if "error" in params or "code" not in params:
            await self.flow.decide(record["device"], device, None, self.clock())
            text = "The identity provider did not sign you in."
            return pages.message(403, "Sign-in refused", text)
        login = LoginStart(params["state"], record["nonce"], record["verifier"])
        try:
            user = await self.oidc.finish(params["code"], login, f"{base}/device/callback")
        except OidcError as exc:
            log.warning("sign-in failed at the identity provider: %s", exc)
            return pages.message(502, "Sign-in failed", str(exc))
        session = Session.new(user.user, user.email, user.groups)
        return await self._approve(record["device"], device, session)

    async def _take_login(self, state: str, browser: str) -> dict[str, Any] | None:
        """The login `state` names, used up, if this browser started it (the page's cookie
        travels with the IdP's redirect back: SameSite=Lax)."""
        raw = await self.store.get(flow.LOGIN + state)
        if raw is None:
            return None
        record: dict[str, Any] = orjson.loads(raw)
        if not browser or not secrets.compare_digest(str(record.get("browser", "")), browser):
            return None
        return record if await self.store.delete(flow.LOGIN + state) else None

    async def _device(self, key: str) -> flow.Device | None:
        raw = await self.store.get(key)
        device = flow.Device.from_json(raw) if raw is not None else None
        if device is None or device.state != "pending" or device.expires_at <= self.clock():
            return None
        return device

    async def _approve(self, key: str, device: flow.Device, session: Session) -> Respond:
        if policy_for(self.config, session.groups) is None:
            await self.flow.decide(key, device, None, self.clock())
            text = f"{session.user} is in no group allowed to use this gateway; ask its admins."
            return pages.message(403, "Not allowed", text)
        await self.flow.decide(key, device, session, self.clock())
        return pages.message(
            200, "Signed in", f"Signed in as {session.user}. Return to your terminal."
        )

    # -- admin -----------------------------------------------------------------------------

    async def revoke_user(self, user: str) -> None:
        await add_revocation(self.store, "u:" + user, self.clock(), self._keep)

    @property
    def _keep(self) -> dict[str, float]:
        """How long revocations matter: a user's until their last refresh token expires, a
        session's until its last access token does (its refresh token is deleted)."""
        return {"u:": self.config.refresh_token_seconds, "s:": self.config.access_token_seconds}
