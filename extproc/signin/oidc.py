"""The gateway as a confidential OpenID Connect client of the company's IdP.

Authorization code flow with PKCE (S256), a `state` and a `nonce` per login, the
client secret sent with HTTP Basic at the token endpoint, and the id_token checked
the way OIDC Core §3.1.3.7 says: signature against the IdP's published keys, issuer,
audience, expiry, nonce. Sign-ins are rare, so the HTTP calls use the standard
library in a worker thread rather than adding a client library to the hot path's
process; each is bounded by `oidc.timeout_seconds`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from extproc.signin.config import OidcConfig

_MAX_ANSWER = 1 << 20
_METADATA_SECONDS = 3600


class OidcError(Exception):
    """The IdP refused or answered something unusable; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class LoginStart:
    """What one browser login needs to remember until the IdP sends the user back."""

    state: str
    nonce: str
    verifier: str

    @classmethod
    def new(cls) -> LoginStart:
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class OidcUser:
    user: str
    email: str | None
    groups: tuple[str, ...]


Fetch = Callable[[urllib.request.Request, float], bytes]


def _fetch(request: urllib.request.Request, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (http(s) only: validated)
            body: bytes = reply.read(_MAX_ANSWER)
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read(4096).decode(errors="replace")
        raise OidcError(f"the identity provider answered {exc.code}: {detail[:200]}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise OidcError(f"the identity provider is unreachable: {exc}") from exc


class OidcClient:
    def __init__(
        self,
        config: OidcConfig,
        client_secret: Callable[[], str],
        fetch: Fetch = _fetch,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._secret = client_secret
        self._fetch = fetch
        self._clock = clock
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: jwt.PyJWKSet | None = None

    async def _get_json(self, request: urllib.request.Request) -> dict[str, Any]:
        if urllib.parse.urlsplit(request.full_url).scheme not in ("http", "https"):
            raise OidcError("the identity provider named a URL that is not http(s)")
        raw = await asyncio.to_thread(self._fetch, request, self.config.timeout_seconds)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise OidcError("the identity provider answered with invalid JSON") from exc
        if not isinstance(data, dict):
            raise OidcError("the identity provider answered with a non-object")
        return data

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None or self._clock() - self._metadata_at > _METADATA_SECONDS:
            url = self.config.issuer + "/.well-known/openid-configuration"
            data = await self._get_json(urllib.request.Request(url))  # noqa: S310 (validated http(s) URLs)
            if data.get("issuer") != self.config.issuer:
                raise OidcError("the identity provider's metadata names another issuer")
            self._metadata, self._metadata_at, self._keys = data, self._clock(), None
        return self._metadata

    async def authorize_url(self, login: LoginStart, redirect_uri: str) -> str:
        endpoint = str((await self.metadata())["authorization_endpoint"])
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": self.config.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(self.config.scopes),
                "state": login.state,
                "nonce": login.nonce,
                "code_challenge": login.challenge,
                "code_challenge_method": "S256",
            }
        )
        return endpoint + ("&" if "?" in endpoint else "?") + query

    async def finish(self, code: str, login: LoginStart, redirect_uri: str) -> OidcUser:
        """Exchange the authorization code and check the id_token; the signed-in user."""
        tokens = await self._exchange(code, login, redirect_uri)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the identity provider returned no id_token")
        claims = await self._verify(id_token, login.nonce)
        return self._user(claims)

    async def _exchange(self, code: str, login: LoginStart, redirect_uri: str) -> dict[str, Any]:
        endpoint = str((await self.metadata())["token_endpoint"])
        form = urllib.parse.urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": login.verifier,
            }
        ).encode()
        pair = f"{urllib.parse.quote(self.config.client_id)}:{urllib.parse.quote(self._secret())}"
        request = urllib.request.Request(endpoint, data=form, method="POST")  # noqa: S310 (validated http(s) URLs)
        request.add_header("content-type", "application/x-www-form-urlencoded")
        request.add_header("authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        return await self._get_json(request)

    async def _verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        try:
            kid = jwt.get_unverified_header(id_token).get("kid")
            key = await self._key(kid)
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA", "PS256"],
                audience=self.config.client_id,
                issuer=self.config.issuer,
                options={"require": ["exp", "iat", "sub"]},
                leeway=30,
            )
        except jwt.PyJWTError as exc:
            raise OidcError(f"the id_token is not valid: {exc}") from exc
        if claims.get("nonce") != nonce:
            raise OidcError("the id_token's nonce does not match this login")
        return claims

    async def _key(self, kid: object) -> Any:
        for attempt in range(2):
            if self._keys is None or attempt:
                url = str((await self.metadata())["jwks_uri"])
                self._keys = jwt.PyJWKSet.from_dict(
                    await self._get_json(urllib.request.Request(url))  # noqa: S310 (validated http(s) URLs)
                )
            for key in self._keys.keys:
                if kid is None or key.key_id == kid:
                    return key.key
        raise OidcError("the id_token is signed with a key the identity provider does not publish")

    def _user(self, claims: dict[str, Any]) -> OidcUser:
        user = claims.get(self.config.user_claim) or claims.get("sub")
        groups = claims.get(self.config.groups_claim) or []
        if isinstance(groups, str):
            groups = [groups]
        email = claims.get("email")
        return OidcUser(
            user=str(user),
            email=email if isinstance(email, str) else None,
            groups=tuple(str(g) for g in groups if isinstance(g, str | int)),
        )
