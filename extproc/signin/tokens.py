"""The gateway's own access tokens: short-lived Ed25519-signed JWTs, checked in process.

An access token carries who the user is (`sub`, `email`), their IdP groups and the
sign-in session (`sid`). Checking one is a signature check and a look at the
revocation list this replica holds in memory: no store round trip per request.
The list (`extproc:sso:revoked`, user and session entries with the time they were
revoked) is re-read at most every `auth.cache_seconds`, so an admin revocation
reaches every replica within that bound, like a revoked gateway key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from extproc.store import Store, StoreError

AUDIENCE = "extproc-gateway"
REVOKED_KEY = "extproc:sso:revoked"
_VERIFIED_MAX = 10_000


class InvalidToken(Exception):
    """The bearer is not a valid, current access token of this gateway (the message says why)."""


@dataclass(frozen=True, slots=True)
class Session:
    """Who signed in: what the access and refresh tokens of one sign-in carry."""

    user: str
    email: str | None
    groups: tuple[str, ...]
    sid: str

    @classmethod
    def new(cls, user: str, email: str | None, groups: tuple[str, ...]) -> Session:
        return cls(user=user, email=email, groups=groups, sid=uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class Claims:
    session: Session
    issued_at: float
    expires_at: float


def load_private_key(pem: str | None) -> Ed25519PrivateKey:
    """The configured Ed25519 key, or a fresh one (a single replica's ephemeral key)."""
    if pem is None:
        return Ed25519PrivateKey.generate()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("sso.signing_key must be an Ed25519 private key in PEM")
    return key


def generate_pem() -> str:
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return raw.decode()


def key_id(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


class TokenSigner:
    """Mints and checks access tokens with one Ed25519 key pair."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        issuer: str,
        lifetime: int,
        clock: Callable[[], float] = time.time,
        previous: Sequence[Ed25519PrivateKey] = (),
    ) -> None:
        self._key = key
        self.kid = key_id(key)
        # Tokens signed by a previous key stay valid until they expire, so rotating
        # `sso.signing_key` signs nobody out.
        self._verifiers = {key_id(k): k.public_key() for k in (*previous, key)}
        self.issuer = issuer
        self.lifetime = lifetime
        self._clock = clock
        # Tokens whose signature checked out. Claude Code sends one token for its whole
        # lifetime, and an Ed25519 check costs ~160 µs here against ~1 µs for the lookup;
        # expiry and revocation are still checked on every request.
        self._verified: dict[str, Claims] = {}

    def owns(self, token: str) -> bool:
        """Whether a bearer is one of our tokens (by its key id), rather than, say, an IdP
        JWT that Envoy's jwt_authn checks (`auth.jwt`)."""
        if not looks_like_jwt(token):
            return False
        try:
            return jwt.get_unverified_header(token).get("kid") in self._verifiers
        except jwt.PyJWTError:
            return False

    def mint(self, session: Session) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": session.user,
            "groups": list(session.groups),
            "sid": session.sid,
            "iat": now,
            "exp": now + self.lifetime,
        }
        if session.email:
            claims["email"] = session.email
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self.kid})

    def check(self, token: str) -> Claims:
        result = self._verified.get(token) or self._verify(token)
        if result.expires_at + 5 < self._clock():
            self._verified.pop(token, None)
            raise InvalidToken("the sign-in has expired; run /login again")
        return result

    def _verify(self, token: str) -> Claims:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            public = self._verifiers.get(kid) if isinstance(kid, str) else None
            if public is None:
                raise InvalidToken("invalid token (unknown signing key); run /login again")
            claims = jwt.decode(
                token,
                public,
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                issuer=self.issuer,
                # Expiry is checked below against this signer's clock.
                options={"require": ["exp", "iat", "sub", "sid"], "verify_exp": False},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken("invalid token; run /login again") from exc
        result = _claims(claims)
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = result
        return result


def _claims(claims: Mapping[str, Any]) -> Claims:
    groups = claims.get("groups")
    email = claims.get("email")
    session = Session(
        user=str(claims["sub"]),
        email=email if isinstance(email, str) else None,
        groups=tuple(str(g) for g in groups) if isinstance(groups, list) else (),
        sid=str(claims["sid"]),
    )
    return Claims(session, float(claims["iat"]), float(claims["exp"]))


class Revocations:
    """Users and sessions revoked, and when; re-read from the store every `ttl` seconds."""

    def __init__(
        self,
        store: Store,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[str, float] = {}
        self._read_at: float | None = None
        self._reading: asyncio.Future[None] | None = None

    async def revoked(self, session: Session, issued_at: float) -> bool:
        """Whether a token (or refresh token) issued at `issued_at` has been revoked."""
        entries = await self._current()
        cutoff = max(entries.get("u:" + session.user, 0.0), entries.get("s:" + session.sid, 0.0))
        return cutoff > 0 and issued_at <= cutoff

    async def _current(self) -> dict[str, float]:
        now = self._clock()
        if self._read_at is not None and now - self._read_at < self._ttl:
            return self._entries
        if self._reading is None:  # one read per replica, however many requests wait
            self._reading = asyncio.ensure_future(self._read(now))
        reading = self._reading
        await asyncio.shield(reading)
        return self._entries

    async def _read(self, now: float) -> None:
        # On a store outage keep the list last read: revoked tokens stay refused and
        # everyone else keeps working.
        try:
            with contextlib.suppress(StoreError):
                self._entries = parse(await self._store.get(REVOKED_KEY))
            self._read_at = now
        finally:
            self._reading = None


def parse(raw: bytes | None) -> dict[str, float]:
    if raw is None:
        return {}
    data = orjson.loads(raw)
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


async def add_revocation(store: Store, entry: str, now: float, keep: Mapping[str, float]) -> None:
    """Add `u:USER` or `s:SESSION` to the list, dropping entries older than `keep[prefix]`
    seconds (every token they could refuse has expired by then)."""
    entries = parse(await store.get(REVOKED_KEY))
    entries = {k: v for k, v in entries.items() if v > now - keep.get(k[:2], 0.0)}
    entries[entry] = now
    await store.set(REVOKED_KEY, orjson.dumps(entries))
