"""The gateway's one config file: frozen pydantic models, validated once at start.

`load_config(path)` is the only entry point. Every problem is reported as a
`ConfigError` whose lines name the file, the key and what to change, so
`extproc check-config` can print them as they are. Nothing here reads the
environment at import time; credentials are resolved when a provider asks.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from extproc.apis.kind import CLOUD_APIS, ApiKind
from extproc.cloud.config import CloudSettings
from extproc.credentials import CredentialSource
from extproc.policies.budget.ledger import BudgetConfig
from extproc.policies.guard.config import GuardConfig
from extproc.policies.pricing import PricingConfig
from extproc.policies.ratelimit import RateLimitConfig, Tier
from extproc.signin.config import OtlpRelayConfig, SsoConfig, check_references
from extproc.translate.config import TranslationConfig

__all__ = [
    "AuditConfig",
    "Config",
    "ConfigError",
    "CredentialSource",
    "HostPort",
    "LimitsConfig",
    "OtelConfig",
    "ProviderConfig",
    "load_config",
    "parse_config",
]

MiB = 1024 * 1024


class ConfigError(Exception):
    """The config cannot be used. `problems` holds one line per error, each naming key and fix."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostPort(_Frozen):
    host: str
    port: int = Field(ge=0, le=65535)

    @classmethod
    def parse(cls, value: object) -> HostPort:
        if isinstance(value, HostPort):
            return value
        if isinstance(value, int):
            return cls(host="127.0.0.1", port=value)
        if not isinstance(value, str):
            raise ValueError("expected 'host:port' (e.g. 127.0.0.1:8080) or a port number")
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{value!r} is not 'host:port' (e.g. 127.0.0.1:8080)")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _host_port(value: object) -> HostPort:
    return HostPort.parse(value)


AddressField = Annotated[HostPort, Field(json_schema_extra={"format": "host:port"})]


_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class ProviderConfig(_Frozen):
    """One upstream model provider. Envoy gets one cluster per provider."""

    api: ApiKind
    base_url: str
    credential: CredentialSource | None = None
    # The Envoy cluster requests for this provider go to; `extproc up` creates
    # `provider_<name>`. Set it when attaching to an Envoy whose clusters you name.
    cluster: str | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # A cloud that hosts Claude (README "Cloud upstreams"): required by `api: bedrock` and
    # `api: vertex`; on `api: anthropic`, Foundry or Claude Platform on AWS credentials.
    cloud: CloudSettings | None = None

    @model_validator(mode="after")
    def _cloud_matches_api(self) -> ProviderConfig:
        serves = self.cloud.serves if self.cloud is not None else None
        if self.cloud is not None and serves != self.api:
            raise ValueError(f"cloud kind {self.cloud.kind} needs api: {serves}")
        if self.api in CLOUD_APIS and serves is None:
            raise ValueError(f"api: {self.api} needs cloud: {{kind: {self.api}, ...}}")
        return self

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r} must not have a query or fragment")
        return value.rstrip("/")

    @property
    def scheme(self) -> str:
        return urlsplit(self.base_url).scheme

    @property
    def hostname(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path_prefix(self) -> str:
        """The base URL's path ('' or '/api'); Envoy rewrites `/v1/...` onto it."""
        return urlsplit(self.base_url).path.rstrip("/")

    @property
    def authority(self) -> str:
        parts = urlsplit(self.base_url)
        default = 443 if parts.scheme == "https" else 80
        return self.hostname if self.port == default else f"{self.hostname}:{self.port}"


_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


class AuditConfig(_Frozen):
    """One record per request. `sink` is `stdout`, `none`, a file path (JSON lines) or a
    `postgresql://` URL (the durable store: batched, spooled to `spool_dir` while Postgres is
    away). The other keys apply to a Postgres sink only."""

    sink: str = "stdout"
    # The default for routes whose profile does not say (profiles.NAME.audit.record_text);
    # a zero-data-retention profile never records text, whatever this says.
    record_text: bool = False
    # The Postgres password from an env var or a file (overrides one in the URL).
    password: CredentialSource | None = None
    table: str = "extproc_audit"
    spool_dir: Path = Path("audit-spool")
    retention_days: int = Field(default=90, ge=1, le=3650)
    partitions_ahead_days: int = Field(default=3, ge=1, le=60)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    flush_seconds: float = Field(default=1.0, gt=0, le=60)
    queue_max: int = Field(default=20_000, ge=100, le=1_000_000)
    retry_seconds: float = Field(default=5.0, gt=0, le=600)

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        if not _TABLE.match(value):
            raise ValueError(f"{value!r}: use lower-case letters, digits and '_' (at most 41)")
        return value

    @property
    def postgres(self) -> bool:
        return urlsplit(self.sink).scheme in ("postgresql", "postgres")


class OtelConfig(_Frozen):
    """OpenTelemetry export (GenAI metrics and one span per request) to an OTLP collector."""

    # grpc: `http://host:4317` (https:// for TLS); http: the base URL, `http://host:4318`
    # (`/v1/traces` and `/v1/metrics` are appended).
    endpoint: str
    protocol: Literal["grpc", "http"] = "grpc"
    # Header name -> value from `env:`, `file:` or `value:` (an API key for a SaaS backend);
    # read once at start.
    headers: dict[str, CredentialSource] = Field(default_factory=dict)
    service_name: str = "extproc"
    # The share of new traces recorded (a caller's sampled `traceparent` is always followed).
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    export_interval_seconds: float = Field(default=15, ge=1, le=3600)
    export_timeout_seconds: float = Field(default=10, gt=0, le=60)
    traces: bool = True
    metrics: bool = True
    # Finished requests buffered for the telemetry process (~2 KB each, within the kernel's
    # socket buffer limit) and spans waiting for export; past this they are dropped.
    max_queue_size: int = Field(default=8192, ge=64, le=1_000_000)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, CredentialSource]) -> dict[str, CredentialSource]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9-]{1,128}", name):
                raise ValueError(f"header name {name!r}: use letters, digits and '-'")
        return value


class TelemetryConfig(_Frozen):
    """Telemetry beyond Prometheus and the audit log."""

    # OTLP export; off when absent.
    otel: OtelConfig | None = None


class LimitsConfig(_Frozen):
    max_body_bytes: int = Field(default=32 * MiB, ge=1024, le=256 * MiB)
    # Work per request is bounded: JSON values in a body (blocks, strings, numbers...) and
    # characters of text a guard scans; past either, 413. See extproc/offload.py.
    max_json_values: int = Field(default=200_000, ge=1_000, le=10_000_000)
    max_scan_chars: int = Field(default=16 * MiB, ge=1024, le=256 * MiB)
    # The most output one request may generate: a larger max_tokens / max_completion_tokens
    # (or none, on OpenAI) is rewritten to it, so the budget reservation is an upper bound.
    max_output_tokens: int = Field(default=64_000, ge=1, le=1_000_000)
    # A provider that sends no response headers for this long gets a 504 (streamed or
    # not). Rendered into the dispatch route's retry_policy.per_try_timeout; it must stay
    # below the route's idle_timeout (600 s), which would otherwise fire first.
    first_byte_timeout_seconds: float = Field(default=90.0, ge=1, le=590)


class EnvoyConfig(_Frozen):
    """Settings only `extproc up` uses: the Envoy it starts."""

    admin: AddressField = HostPort(host="127.0.0.1", port=9901)
    bootstrap: Path | None = None
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "warning"
    # Where Envoy writes its access log (one JSON line per request; see `extproc reconcile`).
    access_log: str = Field(default="/dev/stdout", min_length=1, max_length=4096)
    # Envoy's cap on open downstream connections; None: derived from the file-descriptor
    # limit at start (extproc.fdlimit), which must hold two descriptors per connection.
    max_connections: int | None = Field(default=None, ge=16, le=10_000_000)

    @field_validator("admin", mode="before")
    @classmethod
    def _admin(cls, value: object) -> HostPort:
        return _host_port(value)


_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
Patterns = tuple[str, ...]


class KeyConfig(_Frozen):
    """A gateway key declared in the config, by its hash (`extproc keys hash` prints one)."""

    id: str
    hash: str
    user: str | None = None
    team: str | None = None
    project: str | None = None
    tier: str | None = None
    models: Patterns | None = None
    # requested-model pattern -> served model for this key, first match wins (applied after
    # the route's map and pin, before the tier's map).
    map: dict[str, str] = Field(default_factory=dict)
    expires: dt.datetime | None = None
    disabled: bool = False
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _KEY_ID.match(value):
            raise ValueError(f"{value!r}: use letters, digits and '-' (at most 64)")
        return value

    @field_validator("hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        if not _HASH.match(value):
            raise ValueError(
                "expected 'sha256:' and 64 hex digits; `extproc keys generate` prints one"
            )
        return value

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class JwtConfig(_Frozen):
    """Identity from Envoy's jwt_authn filter (its `payload_in_metadata`)."""

    metadata_namespace: str = "envoy.filters.http.jwt_authn"
    payload_key: str = "jwt_payload"
    user_claim: str = "sub"
    team_claim: str | None = "team"
    project_claim: str | None = None
    tier_claim: str | None = "tier"


class AuthConfig(_Frozen):
    """Who may call. With `required: false` and no gateway key presented, the caller's own
    provider key passes through (the laptop default)."""

    required: bool = False
    keys: tuple[KeyConfig, ...] = ()
    jwt: JwtConfig | None = None
    # How long a replica trusts a store-managed key record before re-reading it: the bound
    # on how long a revoked key keeps working.
    cache_seconds: float = Field(default=3.0, gt=0, le=5)


class TeamConfig(_Frozen):
    models: Patterns | None = None
    tier: str | None = None


class TierConfig(_Frozen):
    models: Patterns | None = None
    # requested-model pattern -> served model, first match wins (e.g. {"claude-opus-*": ...}).
    map: dict[str, str] = Field(default_factory=dict)
    # Daily request quota (UTC calendar day) for each key of this tier; null = unlimited.
    requests_per_day: int | None = Field(default=None, ge=0)


def _default_tiers() -> dict[str, TierConfig]:
    return {
        "free": TierConfig(requests_per_day=10),
        "pro": TierConfig(requests_per_day=1000),
        "enterprise": TierConfig(),
    }


# The first component under a home or temporary directory (/home/runner-7, /tmp/job-42,
# macOS $TMPDIR) and the project directory Claude Code names after it
# (.claude/projects/-tmp-job-42). Each starts with a literal, so a 120 KB request is
# scanned in a tenth of a millisecond per pattern (an alternation of the two: 0.9 ms).
UNIX_DIRECTORIES = (
    r"/(?:home/|Users/|tmp/|\.claude/projects/"
    r"|(?:private/)?var/folders/[^/\s\"'`]+/[^/\s\"'`]+/T/)[^/\s\"'`\\]+"
)
WINDOWS_DIRECTORIES = r":\\Users\\[^\\/\s\"'`]+"  # C:\Users\NAME (after the drive letter)


class NormalizeRule(_Frozen):
    """A cache-key normalisation rule: a built-in name, or a regex and its replacement."""

    BUILTINS: ClassVar[dict[str, str]] = {
        "timestamps": (
            r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"
            r"(?:Z|[+-]\d{2}:?\d{2})?)?"
        ),
        "uuids": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        "hex_ids": r"(?<![0-9A-Za-z])[0-9a-f]{16,}(?![0-9A-Za-z])",
        "numeric_ids": r"(?<![0-9A-Za-z.])\d{9,}(?![0-9A-Za-z])",
        # Home and temporary directories, e.g. a fresh HOME per CI job in Claude Code's
        # system prompt (see UNIX_DIRECTORIES, WINDOWS_DIRECTORIES).
        "paths": f"{UNIX_DIRECTORIES}|{WINDOWS_DIRECTORIES}",
    }
    builtin: Literal["timestamps", "uuids", "hex_ids", "numeric_ids", "paths"] | None = None
    pattern: str | None = None
    replace: str = "<volatile>"

    @model_validator(mode="after")
    def _one(self) -> NormalizeRule:
        if (self.builtin is None) == (self.pattern is None):
            raise ValueError("set exactly one of builtin or pattern")
        try:
            re.compile(self.pattern or "")
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from exc
        return self

    def regex(self) -> re.Pattern[str]:
        return re.compile(self.BUILTINS[self.builtin] if self.builtin else self.pattern or "")


class CacheConfig(_Frozen):
    """A route's response cache (a profile's `cache:`)."""

    enabled: bool = False
    ttl_seconds: float = Field(default=3600, gt=0, le=30 * 86400)
    # Share entries across tenants on this route (default: per team, else per key/user).
    shared: bool = False
    normalize: tuple[NormalizeRule, ...] = ()


class CacheSettings(_Frozen):
    """Process-wide cache limits (top-level `cache:`)."""

    max_entry_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    # How long an identical request waits for the one in flight before going upstream
    # itself; bounded by the ext_proc filter's max_message_timeout (120 s in envoy/).
    wait_seconds: float = Field(default=60, ge=0, le=110)
    lock_seconds: float = Field(default=600, gt=0, le=3600)
    hygiene: bool = True
    hygiene_window_seconds: float = Field(default=3600, gt=0, le=86400)
    charge_budget_on_hit: bool = False


class ProfileAuditConfig(_Frozen):
    # None: the global audit.record_text.
    record_text: bool | None = None


class FallbackStep(_Frozen):
    """One provider of a route's fallback chain, and the model it serves (None: the model the
    request was mapped to)."""

    provider: str
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _short(cls, value: object) -> object:
        return {"provider": value} if isinstance(value, str) else value


# A chain longer than this only adds latency before an error a client would retry anyway.
MAX_FALLBACK_STEPS = 4


class ProfileConfig(_Frozen):
    """Per-route policy. Envoy route metadata `extproc: {profile: NAME, ...}` picks one and may
    override these fields."""

    models: Patterns | None = None
    map: dict[str, str] = Field(default_factory=dict)
    pin: str | None = None
    provider: str | None = None
    refuse: str | None = None
    cache: CacheConfig = CacheConfig()
    # The guard profile for this route (guard.profiles); None: guard.default_profile.
    guard: str | None = None
    audit: ProfileAuditConfig = ProfileAuditConfig()
    # Zero data retention: the audit keeps metadata only (no prompt or answer text), whatever
    # audit.record_text or this profile's audit settings say.
    zero_data_retention: bool = False
    # When the provider speaks the other wire shape (Anthropic <-> OpenAI translation).
    translation: TranslationConfig = TranslationConfig()
    # The ordered providers a request of this profile tries (README "Fallback across
    # providers"): Envoy retries the next one on connect failure, 429, 5xx or 529, before
    # any byte of the answer left. Empty: the one provider routing picks.
    fallback: tuple[FallbackStep, ...] = Field(default=(), max_length=MAX_FALLBACK_STEPS)

    @field_validator("fallback")
    @classmethod
    def _chain(cls, value: tuple[FallbackStep, ...]) -> tuple[FallbackStep, ...]:
        names = [step.provider for step in value]
        if len(names) == 1:
            raise ValueError("a fallback chain needs at least two providers (or none)")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"provider {repeated[0]!r} is in the chain twice; each is tried once")
        return value

    def records_text(self, default: bool) -> bool:
        """Whether this route's audit records keep prompt and answer text."""
        if self.zero_data_retention:
            return False
        return default if self.audit.record_text is None else self.audit.record_text


class ModelRoute(_Frozen):
    match: str
    provider: str


_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_RESERVED_PREFIXES = ("/v1", "/health", "/quota", "/managed", "/oauth", "/.well-known")


class CloudPathsConfig(_Frozen):
    """Where the gateway serves Claude Code's cloud modes (README "Bedrock and Vertex
    clients"): the path prefix a developer's `ANTHROPIC_BEDROCK_BASE_URL` /
    `ANTHROPIC_VERTEX_BASE_URL` ends in; `null` turns one off."""

    bedrock: str | None = "/bedrock"
    vertex: str | None = "/vertex"
    # The Bedrock model ids `GET {bedrock}/inference-profiles` lists (Claude Code asks at
    # start, unauthenticated; an empty list makes it use its default model id).
    inference_profiles: tuple[str, ...] = ()

    @field_validator("bedrock", "vertex")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _PREFIX.fullmatch(value):
            raise ValueError(f"{value!r} must be a path like /bedrock (no trailing /)")
        if value.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"{value!r} overlaps a path the gateway serves itself")
        return value

    @model_validator(mode="after")
    def _apart(self) -> CloudPathsConfig:
        if (
            self.bedrock
            and self.vertex
            and (
                self.bedrock.startswith(self.vertex + "/")
                or self.vertex.startswith(self.bedrock + "/")
                or self.bedrock == self.vertex
            )
        ):
            raise ValueError("cloud_paths.bedrock and cloud_paths.vertex must not nest")
        return self

    def prefixes(self) -> tuple[tuple[str, Literal["bedrock", "vertex"]], ...]:
        pairs: list[tuple[str, Literal["bedrock", "vertex"]]] = []
        if self.bedrock:
            pairs.append((self.bedrock, "bedrock"))
        if self.vertex:
            pairs.append((self.vertex, "vertex"))
        return tuple(pairs)


class ModelsConfig(_Frozen):
    aliases: dict[str, str] = Field(default_factory=dict)
    routes: tuple[ModelRoute, ...] = ()


def _default_providers() -> dict[str, ProviderConfig]:
    return {"anthropic": ProviderConfig(api="anthropic", base_url="https://api.anthropic.com")}


class Config(_Frozen):
    listen: AddressField = HostPort(host="127.0.0.1", port=8080)
    grpc_listen: AddressField = HostPort(host="127.0.0.1", port=50051)
    metrics_listen: AddressField | None = HostPort(host="127.0.0.1", port=9464)
    providers: dict[str, ProviderConfig] = Field(default_factory=_default_providers)
    store: str = "memory://"
    # The Redis password from an env var or a mounted file, so it stays out of ConfigMaps
    # (overrides a password in the `store` URL).
    store_password: CredentialSource | None = None
    audit: AuditConfig = AuditConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    limits: LimitsConfig = LimitsConfig()
    failure_mode_allow: bool = False
    envoy: EnvoyConfig = EnvoyConfig()
    auth: AuthConfig = AuthConfig()
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers)
    profiles: dict[str, ProfileConfig] = Field(default_factory=lambda: {"default": ProfileConfig()})
    models: ModelsConfig = ModelsConfig()
    cache: CacheSettings = CacheSettings()
    pricing: PricingConfig = PricingConfig()
    budgets: BudgetConfig = BudgetConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    # Guardrails (secret/PII redaction, injection and output screening); off when absent.
    guard: GuardConfig | None = None
    # Sign in with the company's SSO (the Claude Code gateway protocol); off when absent.
    sso: SsoConfig | None = None
    otlp_relay: OtlpRelayConfig = OtlpRelayConfig()
    cloud_paths: CloudPathsConfig = CloudPathsConfig()

    @field_validator("listen", "grpc_listen", mode="before")
    @classmethod
    def _addresses(cls, value: object) -> HostPort:
        return _host_port(value)

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _metrics(cls, value: object) -> HostPort | None:
        return None if value is None or value is False else _host_port(value)

    @field_validator("providers")
    @classmethod
    def _providers(cls, value: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        if not value:
            raise ValueError("declare at least one provider")
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"provider name {name!r} must be lower-case letters, digits, '-' or '_'"
                )
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("memory", "redis", "rediss", "unix"):
            raise ValueError(f"{value!r}: use memory:// or a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = [
            *self._unknown("providers", self._provider_refs(), self.providers),
            *self._unknown("tiers", self._tier_refs(), self.tiers),
        ]
        if "tiers" in self.rate_limits.model_fields_set:
            problems.append("rate_limits.tiers: set daily quotas as tiers.NAME.requests_per_day")
        if self.guard is not None:
            problems += self._unknown(
                "guard.profiles",
                [(f"profiles.{n}.guard", p.guard) for n, p in self.profiles.items() if p.guard],
                self.guard.profiles,
            )
        problems += [
            f"profiles.{n}: zero_data_retention: true contradicts audit.record_text: true;"
            " drop one of them"
            for n, p in self.profiles.items()
            if p.zero_data_retention and p.audit.record_text
        ]
        if self.sso is not None:
            problems += check_references(self.sso, self.teams, self.tiers)
            if self.sso.signing_key is None and self.shared_store:
                problems.append(
                    "sso.signing_key: replicas sharing a store need one signing key; "
                    "set it (an Ed25519 PEM: `extproc sso keygen`)"
                )
        problems += self._fallback_problems()
        if "default" not in self.profiles:
            problems.append("profiles: define a 'default' profile (routes without metadata use it)")
        ids = [key.id for key in self.auth.keys]
        problems += [
            f"auth.keys: id {i!r} is declared twice" for i in sorted(set(ids)) if ids.count(i) > 1
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _fallback_problems(self) -> list[str]:
        """Every provider of a chain speaks one API until a translator serves the others."""
        problems = []
        for name, profile in self.profiles.items():
            steps = [s.provider for s in profile.fallback if s.provider in self.providers]
            apis = {self.providers[n].api for n in steps}
            if len(apis) > 1:
                problems.append(
                    f"profiles.{name}.fallback: the chain mixes {' and '.join(sorted(apis))} "
                    "providers; a chain needs providers of one API shape (no translator is "
                    "configured between them)"
                )
            if profile.fallback and profile.provider is not None:
                problems.append(
                    f"profiles.{name}: set provider or fallback, not both (the chain's first "
                    "provider is the one routing picks)"
                )
        return problems

    def _provider_refs(self) -> list[tuple[str, str]]:
        refs = [
            (f"profiles.{n}.provider", p.provider) for n, p in self.profiles.items() if p.provider
        ]
        refs += [
            (f"profiles.{n}.fallback[{i}].provider", s.provider)
            for n, p in self.profiles.items()
            for i, s in enumerate(p.fallback)
        ]
        return refs + [
            (f"models.routes[{i}].provider", r.provider) for i, r in enumerate(self.models.routes)
        ]

    def _tier_refs(self) -> list[tuple[str, str]]:
        refs = [(f"teams.{n}.tier", t.tier) for n, t in self.teams.items() if t.tier]
        return refs + [(f"auth.keys[{k.id}].tier", k.tier) for k in self.auth.keys if k.tier]

    @staticmethod
    def _unknown(kind: str, refs: list[tuple[str, str]], known: dict[str, Any]) -> list[str]:
        return [
            f"{where}: {name!r} is not declared under {kind}: (known: {', '.join(known) or 'none'})"
            for where, name in refs
            if name not in known
        ]

    def rate_limit_config(self) -> RateLimitConfig:
        """`rate_limits` with the daily quotas of `tiers` (one place to name a tier)."""
        tiers = {name: Tier(requests_per_day=t.requests_per_day) for name, t in self.tiers.items()}
        return self.rate_limits.model_copy(update={"tiers": tiers})

    @property
    def shared_store(self) -> bool:
        return not self.store.startswith("memory:")


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling against the README"
        problems.append(f"{key}: {message}")
    return problems


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of keys to values"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from exc


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML config; `None` gives the documented defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    config = parse_config(data, source)
    bootstrap = config.envoy.bootstrap
    if bootstrap is not None and not bootstrap.is_absolute():
        # A relative bootstrap path is relative to the config file, not the working directory.
        envoy = config.envoy.model_copy(update={"bootstrap": Path(path).parent / bootstrap})
        config = config.model_copy(update={"envoy": envoy})
    return config
