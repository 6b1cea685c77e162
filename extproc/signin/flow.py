"""The device authorization grant (RFC 8628) and refresh tokens, kept in the store.

Store layout (every value JSON, every key with a TTL):

    extproc:sso:device:<sha256(device_code)>   {user_code, client_id, state, expires_at,
                                                interval, last_poll, session?}
    extproc:sso:user_code:<USERCODE>            the device key it belongs to
    extproc:sso:login:<state>                   one browser login in progress (PKCE, nonce)
    extproc:sso:refresh:<sha256(refresh)>       {session, client_id, issued_at}
    extproc:sso:sid:<sid>                       the live refresh key of a session (sign-out)

Only hashes of device codes and refresh tokens are stored. Device codes carry 256 bits,
user codes 8 letters of a 20-consonant alphabet (RFC 8628 §6.1: no vowels, so no words;
≈ 2^34.6, with per-IP rate limits on the page that takes them). A code is single-use:
of two polls that find it approved, only the one whose `delete` succeeds gets tokens.
Refresh tokens rotate: each is used once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson

from extproc.signin.tokens import Session
from extproc.store import Store

USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
DEVICE = "extproc:sso:device:"
USER_CODE = "extproc:sso:user_code:"
LOGIN = "extproc:sso:login:"
REFRESH = "extproc:sso:refresh:"
SID = "extproc:sso:sid:"
# How long a used or expired device code is remembered, to answer replays precisely.
TOMBSTONE_SECONDS = 600

State = Literal["pending", "approved", "denied", "used"]


class GrantError(Exception):
    """An OAuth error answer: `error` is the RFC code, `status` the HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_user_code() -> str:
    letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
    return f"{letters[:4]}-{letters[4:]}"


def normalize_user_code(text: str) -> str:
    """What a person typed, as stored: upper case, separators dropped (RFC 8628 §6.1)."""
    letters = "".join(c for c in text.upper() if c.isalnum())[:16]
    return f"{letters[:4]}-{letters[4:]}"


@dataclass
class Device:
    user_code: str
    client_id: str | None
    expires_at: float
    interval: int
    state: State = "pending"
    last_poll: float = 0.0
    session: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Device:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class Issued:
    session: Session
    refresh_token: str


def _session_json(session: Session) -> dict[str, Any]:
    return {
        "user": session.user,
        "email": session.email,
        "groups": list(session.groups),
        "sid": session.sid,
    }


def _session(data: dict[str, Any]) -> Session:
    return Session(data["user"], data.get("email"), tuple(data.get("groups", ())), data["sid"])


class DeviceFlow:
    def __init__(
        self, store: Store, code_seconds: int, interval: int, refresh_seconds: int
    ) -> None:
        self.store = store
        self.code_seconds = code_seconds
        self.interval = interval
        self.refresh_seconds = refresh_seconds

    async def start(self, client_id: str | None, now: float) -> tuple[str, str]:
        """A new device code and user code."""
        device_code = secrets.token_urlsafe(32)  # 256 bits
        for _ in range(5):
            user_code = new_user_code()
            device = Device(user_code, client_id, now + self.code_seconds, self.interval)
            ttl = self.code_seconds + TOMBSTONE_SECONDS
            key = DEVICE + digest(device_code)
            if await self.store.set(
                USER_CODE + user_code, key.encode(), self.code_seconds, only_if_absent=True
            ):
                await self.store.set(key, device.to_json(), ttl)
                return device_code, user_code
        raise GrantError("temporarily_unavailable", "could not allocate a user code", 503)

    async def by_user_code(self, user_code: str, now: float) -> tuple[str, Device] | None:
        """The pending device a user code belongs to (None: unknown, used or expired)."""
        key = await self.store.get(USER_CODE + normalize_user_code(user_code))
        if key is None:
            return None
        raw = await self.store.get(key.decode())
        device = Device.from_json(raw) if raw is not None else None
        if device is None or device.state != "pending" or device.expires_at <= now:
            return None
        return key.decode(), device

    async def decide(self, key: str, device: Device, session: Session | None, now: float) -> None:
        """Approve (with the signed-in session) or deny a device code."""
        device.state = "approved" if session is not None else "denied"
        device.session = _session_json(session) if session is not None else None
        await self.store.delete(USER_CODE + device.user_code)
        await self.store.set(key, device.to_json(), self._ttl(device, now))

    async def poll(self, device_code: str, client_id: str | None, now: float) -> Issued:
        """One token-endpoint poll (RFC 8628 §3.4, §3.5)."""
        key = DEVICE + digest(device_code)
        raw = await self.store.get(key)
        if raw is None:
            raise GrantError("invalid_grant", "unknown device_code")
        device = Device.from_json(raw)
        if device.client_id != client_id:
            raise GrantError("invalid_grant", "the device_code was issued to another client")
        if device.state == "used":
            raise GrantError("invalid_grant", "the device_code has been used already")
        if device.expires_at <= now:
            raise GrantError("expired_token", "the device_code has expired; sign in again")
        if device.state == "denied":
            raise GrantError("access_denied", "the sign-in was denied")
        if device.state == "pending":
            return await self._pending(key, device, now)
        return await self._redeem(key, device, client_id, now)

    async def _pending(self, key: str, device: Device, now: float) -> Issued:
        too_soon = now - device.last_poll < device.interval
        if too_soon:
            device.interval += 5
        device.last_poll = now
        await self.store.set(key, device.to_json(), self._ttl(device, now))
        if too_soon:
            raise GrantError("slow_down", f"poll at most every {device.interval} s")
        raise GrantError("authorization_pending", "the user has not approved the sign-in yet")

    async def _redeem(self, key: str, device: Device, client_id: str | None, now: float) -> Issued:
        if not await self.store.delete(key):
            raise GrantError("invalid_grant", "the device_code has been used already")
        device.state = "used"
        await self.store.set(key, device.to_json(), TOMBSTONE_SECONDS)
        assert device.session is not None
        return await self.issue(_session(device.session), client_id, now)

    def _ttl(self, device: Device, now: float) -> float:
        return max(1.0, device.expires_at - now) + TOMBSTONE_SECONDS

    async def issue(self, session: Session, client_id: str | None, now: float) -> Issued:
        refresh = secrets.token_urlsafe(32)
        record = {"session": _session_json(session), "client_id": client_id, "issued_at": now}
        key = REFRESH + digest(refresh)
        await self.store.set(key, orjson.dumps(record), self.refresh_seconds)
        await self.store.set(SID + session.sid, key.encode(), self.refresh_seconds)
        return Issued(session, refresh)

    async def take_refresh(self, refresh: str, client_id: str | None) -> tuple[Session, float]:
        """Use a refresh token up (it rotates); its session and when it was issued."""
        key = REFRESH + digest(refresh)
        raw = await self.store.get(key)
        if raw is None or not await self.store.delete(key):
            raise GrantError("invalid_grant", "unknown, used or revoked refresh_token", 401)
        record = orjson.loads(raw)
        if record.get("client_id") != client_id:
            raise GrantError("invalid_grant", "the refresh_token was issued to another client", 401)
        return _session(record["session"]), float(record["issued_at"])

    async def sign_out(self, refresh: str | None, sid: str | None) -> None:
        """Forget a refresh token, or the live one of a session."""
        if sid is not None:
            key = await self.store.get(SID + sid)
            if key is not None:
                await self.store.delete(key.decode())
            await self.store.delete(SID + sid)
        if refresh is not None:
            await self.store.delete(REFRESH + digest(refresh))
