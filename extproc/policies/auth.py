"""Gateway keys and caller identity.

A gateway key looks like `gwk_<id>_<secret>`: the id finds the record, the
whole key is checked against the record's SHA-256 hash in constant time. Keys
are random (256 bits), so a fast hash is the right tool: there is nothing to
brute-force that a slow hash would protect. Neither config nor store ever holds
a key in clear.

Records come from the config (`auth.keys`, hashes only) or the store
(`extproc keys create|revoke|rotate`). A replica trusts a store record for
`auth.cache_seconds` (at most 5 s) before reading it again: that is how long a
revoked key can keep working. If the store is down, a replica keeps using the
record it last read and refuses keys it has never seen (503).

Identity can also come from a JWT that Envoy's jwt_authn filter validated; when a
request carries both, the gateway key wins (it is the more specific identity:
a pipeline's key used from an SSO'd laptop is billed to the pipeline).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from extproc.config import AuthConfig, JwtConfig, KeyConfig
from extproc.errors import BadRequest, Unauthorized, Unavailable
from extproc.policies.step import Done, Exchange, Run
from extproc.store import Store, StoreError

if TYPE_CHECKING:
    from extproc.gateway import Gateway

KEY_PREFIX = "gwk_"
STORE_PREFIX = "extproc:key:"


def new_key(key_id: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id inside a gateway key, or None if it is not one of ours."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    return key_id if sep and key_id and secret else None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    hash: str
    user: str | None = None
    team: str | None = None
    project: str | None = None
    tier: str | None = None
    models: tuple[str, ...] | None = None
    map: Mapping[str, str] = field(default_factory=dict)  # requested -> served, for this key
    expires_at: float | None = None
    disabled: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: float | None = None
    # After `rotate --overlap`, the previous key keeps working until previous_expires_at.
    previous_hash: str | None = None
    previous_expires_at: float | None = None

    @classmethod
    def from_config(cls, key: KeyConfig) -> KeyRecord:
        expires = key.expires.timestamp() if key.expires else None
        return cls(
            id=key.id,
            hash=key.hash,
            user=key.user,
            team=key.team,
            project=key.project,
            tier=key.tier,
            models=key.models,
            map=dict(key.map),
            expires_at=expires,
            disabled=key.disabled,
            labels=dict(key.labels),
        )

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> KeyRecord:
        data: dict[str, Any] = orjson.loads(raw)
        if data.get("models") is not None:
            data["models"] = tuple(data["models"])
        return cls(**data)

    def matches(self, key: str, now: float) -> bool:
        presented = hash_key(key)
        if hmac.compare_digest(presented, self.hash):
            return True
        previous_valid = self.previous_hash and (self.previous_expires_at or 0) > now
        return bool(previous_valid and hmac.compare_digest(presented, self.previous_hash or ""))


@dataclass(frozen=True, slots=True)
class Identity:
    source: str  # "key", "jwt", "sso" (our own sign-in tokens) or "anonymous"
    key_id: str | None = None
    user: str | None = None
    team: str | None = None
    project: str | None = None
    tier: str | None = None
    models: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    map: Mapping[str, str] = field(default_factory=dict)  # the key's model mapping

    @property
    def caller(self) -> str | None:
        return self.key_id or self.user

    def scopes(self) -> dict[str, str | None]:
        return {"key": self.key_id, "user": self.user, "team": self.team, "project": self.project}

    def audit_fields(self, done: object = None) -> dict[str, Any]:
        """The auth step's part of the audit record: who called."""
        fields: dict[str, Any] = {
            "caller": self.caller,
            "identity": self.source,
            "key_id": self.key_id,
            "user": self.user,
            "team": self.team,
            "project": self.project,
            "tier": self.tier,
        }
        if "sso_group" in self.labels:  # the sso.groups policy a signed-in user got
            fields["sso_group"] = self.labels["sso_group"]
        return fields


ANONYMOUS = Identity(source="anonymous")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The credential a caller sent (`x-api-key` or `Authorization: Bearer`)."""
    api_key = headers.get("x-api-key", "").strip() or None
    authorization = headers.get("authorization", "").strip()
    bearer = None
    if authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip() or None
    if api_key and bearer and api_key != bearer:
        raise BadRequest(
            "the request carries two different credentials, x-api-key and Authorization: "
            "Bearer; send one (Claude Code sends ANTHROPIC_API_KEY as x-api-key and "
            "ANTHROPIC_AUTH_TOKEN as Authorization: unset one of them, or set both to the "
            "same key)",
            reason="two_keys",
        )
    return api_key or bearer


def identity_of(record: KeyRecord) -> Identity:
    return Identity(
        source="key",
        key_id=record.id,
        user=record.user,
        team=record.team,
        project=record.project,
        tier=record.tier,
        models=record.models,
        labels=record.labels,
        map=record.map,
    )


def identity_from_claims(claims: Mapping[str, Any], config: JwtConfig) -> Identity | None:
    def claim(name: str | None) -> str | None:
        value = claims.get(name) if name else None
        if isinstance(value, list):
            value = value[0] if value else None
        return str(value) if value not in (None, "") else None

    user = claim(config.user_claim)
    if user is None:
        return None
    return Identity(
        source="jwt",
        user=user,
        team=claim(config.team_claim),
        project=claim(config.project_claim),
        tier=claim(config.tier_claim),
    )


async def identify(gw: Gateway, key: str | None, jwt_metadata: Mapping[str, Any]) -> Identity:
    """The auth step, in the request headers: who calls, from the gateway key `key` (the
    presented credential), a sign-in token, or the claims of a JWT that Envoy's jwt_authn
    validated. `Unauthorized` when the route requires a caller and none holds."""
    config = gw.config
    identity = None
    if key is not None and key_id_of(key) is not None:
        identity = await gw.keys.authenticate(key)
    elif key is not None and gw.signin is not None and gw.signin.signer.owns(key):
        identity = await gw.signin.authenticate(key)
    elif config.auth.jwt is not None:
        claims = jwt_metadata.get(config.auth.jwt.payload_key)
        if isinstance(claims, Mapping):
            identity = identity_from_claims(claims, config.auth.jwt)
    if identity is None and config.auth.required:
        if key is None:
            raise Unauthorized(
                "missing gateway key: send it as x-api-key or Authorization: Bearer",
                reason="missing_key",
            )
        raise Unauthorized("invalid gateway key", reason="invalid_key")
    return identity or ANONYMOUS


class AuthRun(Run):
    """The auth step on one request: who calls, found at the request headers."""

    __slots__ = ("identity", "key")

    def __init__(self) -> None:
        self.identity: Identity = ANONYMOUS  # until the headers hook (and for sign-in, probes)
        self.key: str | None = None  # the credential the caller presented

    async def headers(self, exchange: Exchange) -> None:
        self.key = presented_key(exchange.headers)
        self.identity = await identify(exchange.gw, self.key, exchange.jwt_metadata)

    def audit_fields(self, done: Done) -> Mapping[str, Any]:
        return self.identity.audit_fields(done)


class AuthStep:
    """Auth's place in the step order: first, on every request (anonymous unless a key,
    sign-in token or JWT names the caller; `auth.required` refuses an anonymous one)."""

    def open(self, exchange: Exchange) -> AuthRun:
        return AuthRun()


AUTH = AuthStep()


class KeyDirectory:
    """Finds and verifies gateway keys: config keys first, then the store."""

    def __init__(
        self,
        config: AuthConfig,
        store: Store | None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config_keys = {k.id: KeyRecord.from_config(k) for k in config.keys}
        self._store = store
        self._ttl = config.cache_seconds
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        # Each key's Identity, made once per record (frozen: every request may share it).
        self._identities: dict[str, tuple[KeyRecord, Identity]] = {}

    async def record(self, key_id: str) -> KeyRecord | None:
        if key_id in self._config_keys:
            return self._config_keys[key_id]
        if self._store is None:
            return None
        cached = self._cache.get(key_id)
        now = self._clock()
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        try:
            raw = await self._store.get(STORE_PREFIX + key_id)
        except StoreError as exc:
            if cached is not None:
                return cached[1]
            raise Unavailable(
                "the key store is unreachable; try again shortly", reason="store_down"
            ) from exc
        record = KeyRecord.from_json(raw) if raw is not None else None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key_id] = (now, record)
        return record

    async def authenticate(self, key: str) -> Identity:
        key_id = key_id_of(key)
        record = await self.record(key_id) if key_id else None
        now = self._wall()
        if record is None or not record.matches(key, now):
            raise Unauthorized("invalid gateway key", reason="invalid_key")
        if record.disabled:
            raise Unauthorized(f"gateway key {record.id!r} is disabled", reason="key_disabled")
        if record.expires_at is not None and record.expires_at <= now:
            when = dt.datetime.fromtimestamp(record.expires_at, dt.UTC).isoformat(
                timespec="seconds"
            )
            raise Unauthorized(f"gateway key {record.id!r} expired at {when}", reason="key_expired")
        return self._identity(record)

    def _identity(self, record: KeyRecord) -> Identity:
        found = self._identities.get(record.id)
        if found is not None and found[0] is record:
            return found[1]
        if len(self._identities) > 100_000:  # as many as the record cache holds
            self._identities.clear()
        identity = identity_of(record)
        self._identities[record.id] = (record, identity)
        return identity


def revoked(record: KeyRecord) -> KeyRecord:
    return replace(record, disabled=True, previous_hash=None, previous_expires_at=None)
