"""The gateway's one config file: frozen pydantic models, validated once at start.

`load_config(path)` is the only entry point. Every problem is reported as a
`ConfigError` whose lines name the file, the key and what to change, so
`extproc check-config` can print them as they are. Nothing here reads the
environment at import time; credentials are resolved when a provider asks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "AuditConfig",
    "Config",
    "ConfigError",
    "CredentialSource",
    "HostPort",
    "LimitsConfig",
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


class CredentialSource(_Frozen):
    """Where a provider credential comes from: exactly one of env, file or value.

    A file is re-read when its modification time changes (mounted Kubernetes
    Secrets are rotated in place).
    """

    env: str | None = None
    file: Path | None = None
    value: SecretStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        given = [k for k in ("env", "file", "value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of env, file or value")
        return self

    def describe(self) -> str:
        if self.env is not None:
            return f"env {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        return "inline value"


ApiKind = Literal["anthropic", "openai"]

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


class AuditConfig(_Frozen):
    """One JSON line per request. `sink` is `stdout`, `none` or a file path."""

    sink: str = "stdout"
    record_text: bool = False


class LimitsConfig(_Frozen):
    max_body_bytes: int = Field(default=32 * MiB, ge=1024, le=256 * MiB)


class EnvoyConfig(_Frozen):
    """Settings only `extproc up` uses: the Envoy it starts."""

    admin: AddressField = HostPort(host="127.0.0.1", port=9901)
    bootstrap: Path | None = None
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "warning"

    @field_validator("admin", mode="before")
    @classmethod
    def _admin(cls, value: object) -> HostPort:
        return _host_port(value)


def _default_providers() -> dict[str, ProviderConfig]:
    return {"anthropic": ProviderConfig(api="anthropic", base_url="https://api.anthropic.com")}


class Config(_Frozen):
    listen: AddressField = HostPort(host="127.0.0.1", port=8080)
    grpc_listen: AddressField = HostPort(host="127.0.0.1", port=50051)
    metrics_listen: AddressField | None = HostPort(host="127.0.0.1", port=9464)
    providers: dict[str, ProviderConfig] = Field(default_factory=_default_providers)
    store: str = "memory://"
    audit: AuditConfig = AuditConfig()
    limits: LimitsConfig = LimitsConfig()
    failure_mode_allow: bool = False
    envoy: EnvoyConfig = EnvoyConfig()

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

    @property
    def shared_store(self) -> bool:
        return not self.store.startswith("memory:")

    def default_provider(self, api: ApiKind) -> str | None:
        """The first provider declared for an API shape: where its requests go by default."""
        return next((name for name, p in self.providers.items() if p.api == api), None)


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
    return parse_config(data, source)
