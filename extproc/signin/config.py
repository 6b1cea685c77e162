"""Config of the Claude Code sign-in protocol (`sso:`) and the OTLP relay (`otlp_relay:`).

Frozen pydantic models like the rest of the config; `extproc.config.Config` holds
them. Nothing here does I/O: secrets are `CredentialSource`s resolved at start.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extproc.credentials import CredentialSource


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not have a query or fragment")
    return value.rstrip("/")


class OidcConfig(_Frozen):
    """The company's OpenID Connect provider; the gateway is a confidential client of it."""

    issuer: str
    client_id: str
    client_secret: CredentialSource
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    # Which id_token claim names the user, and which one lists the user's groups.
    user_claim: str = "email"
    groups_claim: str = "groups"
    timeout_seconds: float = Field(default=10, gt=0, le=60)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return _http_url(value)


class GroupPolicy(_Frozen):
    """What members of an IdP group get. `team` and `tier` name entries of `teams:` and
    `tiers:`, so their allow-lists, model mapping, budgets and rate limits apply."""

    group: str = "*"
    team: str | None = None
    tier: str | None = None
    project: str | None = None
    models: tuple[str, ...] | None = None
    # Claude Code's managed-settings.json for these users (`GET /managed/settings`);
    # null answers 404 ("no managed policy").
    settings: dict[str, Any] | None = None


class SsoConfig(_Frozen):
    """Sign in with the company's SSO: the Claude Code gateway protocol."""

    oidc: OidcConfig
    # The gateway's external base URL (https://gw.corp.example.com). It is the token
    # issuer and the origin of every advertised endpoint; the IdP must allow
    # `<public_url>/device/callback` as a redirect URI. Unset: taken from each request's
    # Host and scheme (fine on a laptop, set it behind a proxy).
    public_url: str | None = None
    # Ed25519 private key (PEM) that signs access tokens. Every replica needs the same
    # one; unset, each process makes its own at start (one replica, memory:// only).
    signing_key: CredentialSource | None = None
    # Keys signed with before a rotation: their tokens are accepted until they expire.
    previous_signing_keys: tuple[CredentialSource, ...] = ()
    access_token_seconds: int = Field(default=3600, ge=60, le=86400)
    refresh_token_seconds: int = Field(default=30 * 86400, ge=300, le=365 * 86400)
    device_code_seconds: int = Field(default=600, ge=60, le=1800)
    poll_interval_seconds: int = Field(default=5, ge=1, le=60)
    # Per client IP, over all unauthenticated sign-in endpoints (RFC 8628 §5.1).
    requests_per_minute: int = Field(default=60, ge=1, le=100_000)
    max_form_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    # First match wins, in this order, against the user's IdP groups.
    groups: tuple[GroupPolicy, ...] = ()
    # For users in none of `groups`; null refuses them (at sign-in and on every request).
    default: GroupPolicy | None = None

    @field_validator("public_url")
    @classmethod
    def _public(cls, value: str | None) -> str | None:
        return _http_url(value) if value is not None else None


class OtlpRelayConfig(_Frozen):
    """Where the OTLP that Claude Code sends to `/v1/{metrics,logs,traces}` goes."""

    # An OTLP/HTTP collector base URL (http://collector:4318); null drops what arrives.
    endpoint: str | None = None
    timeout_seconds: float = Field(default=5, gt=0, le=60)
    # Exports in flight at once; more are dropped (and counted), never queued without bound.
    max_in_flight: int = Field(default=16, ge=1, le=1024)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _http_url(value) if value is not None else None


def check_references(sso: SsoConfig, teams: dict[str, Any], tiers: dict[str, Any]) -> list[str]:
    """Problems with group policies naming teams or tiers the config does not declare."""
    policies = [(f"sso.groups[{i}]", p) for i, p in enumerate(sso.groups)]
    if sso.default is not None:
        policies.append(("sso.default", sso.default))
    problems = []
    for where, policy in policies:
        if policy.team is not None and policy.team not in teams:
            problems.append(f"{where}: team {policy.team!r} is not declared under teams:")
        if policy.tier is not None and policy.tier not in tiers:
            problems.append(f"{where}: tier {policy.tier!r} is not declared under tiers:")
    return problems


__all__ = ["GroupPolicy", "OidcConfig", "OtlpRelayConfig", "SsoConfig", "check_references"]
