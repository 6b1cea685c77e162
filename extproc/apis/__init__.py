"""The provider API shapes the gateway serves, and how a request is classified.

`classify(method, path, headers)` maps an HTTP request onto an `Endpoint`
(Anthropic Messages, count_tokens, models; OpenAI chat completions, models).
`error_response(api, error)` renders a `GatewayError` in the caller's shape
through its dialect (`extproc.apis.dialect`); it is the only place gateway errors
become response bodies.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from extproc.apis import cloud_dialects as _cloud_dialects  # noqa: F401  (registers them)
from extproc.apis.clouds import CloudAction, CloudKind, CloudPath, parse_cloud_path
from extproc.apis.dialect import Dialect, dialect_of
from extproc.apis.kind import ApiKind
from extproc.decisions import Respond
from extproc.errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, NotSupported

__all__ = [
    "ApiKind",
    "Dialect",
    "Endpoint",
    "api_of_path",
    "classify",
    "cloud_kind_of",
    "dialect_of",
    "error_response",
]


class Endpoint(enum.Enum):
    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    MODELS = "models"
    CHAT_COMPLETIONS = "chat_completions"
    QUOTA = "quota"
    MANAGED_SETTINGS = "managed_settings"  # Claude Code's gateway protocol (extproc.signin)
    OTLP = "otlp"
    PROBE = "probe"  # `/`, `/health`: answered by the gateway, no credential needed
    INFERENCE_PROFILES = "inference_profiles"  # Bedrock clients' listing: answered here

    @property
    def generates(self) -> bool:
        """Whether the endpoint runs a model (and so has usage, cost, streaming)."""
        return self in (Endpoint.MESSAGES, Endpoint.CHAT_COMPLETIONS)


@dataclass(frozen=True, slots=True)
class Route:
    api: ApiKind
    endpoint: Endpoint
    method: str
    cloud: CloudPath | None = None  # a Bedrock or Vertex client's path, parsed


_EXACT: dict[str, tuple[ApiKind | None, Endpoint, str]] = {
    "/v1/messages": ("anthropic", Endpoint.MESSAGES, "POST"),
    "/v1/messages/count_tokens": ("anthropic", Endpoint.COUNT_TOKENS, "POST"),
    "/v1/chat/completions": ("openai", Endpoint.CHAT_COMPLETIONS, "POST"),
    "/v1/models": (None, Endpoint.MODELS, "GET"),
    "/v1/gateway/quota": (None, Endpoint.QUOTA, "GET"),
    "/managed/settings": ("anthropic", Endpoint.MANAGED_SETTINGS, "GET"),
    **{f"/v1/{s}": ("anthropic", Endpoint.OTLP, "POST") for s in ("metrics", "logs", "traces")},
    "/quota": (None, Endpoint.QUOTA, "GET"),
    "/": (None, Endpoint.PROBE, "GET HEAD"),
    "/health": (None, Endpoint.PROBE, "GET HEAD"),
}
_OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/responses")


def api_of_path(path: str, headers: Mapping[str, str]) -> ApiKind:
    """The API shape a caller speaks: by path, else Anthropic's marker headers."""
    if path.startswith(_OPENAI_PREFIXES):
        return "openai"
    if path.startswith("/v1/messages") or "anthropic-version" in headers or "x-api-key" in headers:
        return "anthropic"
    if headers.get("authorization", "").lower().startswith("bearer "):
        return "openai"
    return "anthropic"


# A model id in a path segment: what check_model allows in a body, minus `/`, and never a
# dot segment or an encoded byte (Envoy normalises paths first; this holds without it).
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,255}")


def check_model_id(model_id: str) -> None:
    """`BadRequest` unless `model_id` (empty: the listing) is a plain model id."""
    if model_id and (not _MODEL_ID.fullmatch(model_id) or ".." in model_id):
        raise BadRequest(
            "the model id in /v1/models/<id> may contain only letters, digits and . _ : @ + -",
            reason="invalid_model",
        )


CloudPrefixes = Sequence[tuple[str, CloudKind]]


def cloud_kind_of(raw_path: str, clouds: CloudPrefixes) -> CloudKind | None:
    """The cloud whose client-facing prefix `raw_path` is under (None: not a cloud path)."""
    path = raw_path.split("?", 1)[0]
    return next((kind for p, kind in clouds if path == p or path.startswith(p + "/")), None)


_CLOUD_ENDPOINTS = {
    CloudAction.INFERENCE_PROFILES: Endpoint.INFERENCE_PROFILES,
    CloudAction.COUNT_TOKENS: Endpoint.COUNT_TOKENS,
}


def _classify_cloud(method: str, raw_path: str, prefix: str, kind: CloudKind) -> Route:
    where = parse_cloud_path(method, raw_path, prefix, kind)
    assert where is not None  # the prefix matched
    if kind == "bedrock" and where.action is CloudAction.COUNT_TOKENS:
        raise NotSupported(
            "Bedrock has no count_tokens for Anthropic models; Claude Code estimates locally",
            reason="not_supported",
            retryable=False,
        )
    endpoint = _CLOUD_ENDPOINTS.get(where.action, Endpoint.MESSAGES)
    return Route(api=kind, endpoint=endpoint, method=method, cloud=where)


def classify(
    method: str, raw_path: str, headers: Mapping[str, str], clouds: CloudPrefixes = ()
) -> Route:
    """The endpoint a request is for; `NotFound`/`MethodNotAllowed` for anything else.
    `clouds`: the configured Bedrock/Vertex client prefixes (`cloud_paths`)."""
    cloud = cloud_kind_of(raw_path, clouds)
    if cloud is not None:
        prefix = next(p for p, k in clouds if k == cloud)
        return _classify_cloud(method, raw_path, prefix, cloud)
    path = raw_path.split("?", 1)[0]
    api = api_of_path(path, headers)
    if path.startswith("/v1/models/") and path.count("/") == 3:
        check_model_id(path.removeprefix("/v1/models/"))
        path = "/v1/models"
    entry = _EXACT.get(path.rstrip("/") or "/")
    if entry is None:
        raise NotFound(f"the gateway does not serve {path!r}; see the README for the paths it does")
    kind, endpoint, allowed = entry
    if method not in allowed.split():
        raise MethodNotAllowed(f"{path} accepts {allowed.replace(' ', ' or ')}, not {method}")
    return Route(api=kind or api, endpoint=endpoint, method=method)


def error_response(api: ApiKind, error: GatewayError, request_id: str = "") -> Respond:
    """A gateway error as an immediate response in the caller's API error shape: the
    `error.type` its status has at the provider, `x-gateway-error: <reason>`,
    `x-gateway-request-id` and `x-should-retry` (see `extproc.errors`)."""
    body = dialect_of(api).error_body(error.status, error.message, error.reason)
    headers: tuple[tuple[str, str], ...] = (
        ("content-type", "application/json"),
        ("x-gateway-error", error.reason),
        # The SDKs and Claude Code obey this over their own status rules.
        ("x-should-retry", "true" if error.retryable else "false"),
    )
    if request_id:
        headers += (("x-gateway-request-id", request_id),)
    return Respond(
        status=error.status,
        body=body,
        headers=headers + error.headers,
        details=f"extproc_{error.reason}",
    )
