"""How an Anthropic Messages request is reshaped for each cloud that serves Claude (pure).

Each function takes the request as the gateway holds it (the parsed JSON body, the path's
endpoint, the client's `anthropic-beta` list) and returns what the provider expects. None
of them touch the network or credentials; signing happens on the returned bytes.

- Bedrock: `/model/{id}/invoke[-with-response-stream]` with `{id}` URL-encoded; the body
  without `model`/`stream`, with `anthropic_version: bedrock-2023-05-31` and the
  `anthropic-beta` header as an `anthropic_beta` list; SigV4 for service `bedrock`.
- Vertex: `/v1/projects/{p}/locations/{r}/publishers/anthropic/models/{id}@{v}:rawPredict`
  (`:streamRawPredict` when streaming); the body without `model`, with
  `anthropic_version: vertex-2023-10-16`; an OAuth bearer token.
- Foundry: `{base}/v1/messages` (base `https://{resource}.services.ai.azure.com/anthropic`),
  body unchanged; `x-api-key` (+ `api-key`) or an Entra ID bearer token.
- Claude Platform on AWS: `/v1/messages`, body unchanged, `anthropic-workspace-id`; SigV4
  for service `aws-external-anthropic`, or `x-api-key`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

BEDROCK_VERSION = "bedrock-2023-05-31"
# The beta flags Bedrock's InvokeModel accepts for Anthropic models (AWS "Anthropic Claude
# Messages API" parameters page, as of 2026-12). Bedrock answers any other flag with 400
# "invalid beta flag", and Anthropic clients send Anthropic-API-only ones (claude-code-*,
# oauth-*, mcp-servers-*), so the others are dropped; `cloud.betas` overrides the list.
BEDROCK_BETAS: tuple[str, ...] = (
    "computer-use-2024-10-22",
    "computer-use-2025-01-24",
    "token-efficient-tools-2025-02-19",
    "interleaved-thinking-2025-05-14",
    "output-128k-2025-02-19",
    "dev-full-thinking-2025-05-14",
    "context-1m-2025-08-07",
    "context-management-2025-06-27",
    "effort-2025-11-24",
    "tool-search-tool-2025-10-19",
    "tool-examples-2025-10-29",
)
VERTEX_VERSION = "vertex-2023-10-16"
EVENT_STREAM = "application/vnd.amazon.eventstream"

# Bedrock ids: `anthropic.claude-...-v1:0`, with an optional cross-region inference profile
# prefix (`us.`, `eu.`, `apac.`, `global.`, ...), or an inference-profile / model ARN.
_BEDROCK_ID = re.compile(r"^(?:[a-z]{2,8}\.)?anthropic\.[a-z0-9.-]{1,120}(?::\d{1,4})?$")
_BEDROCK_ARN = re.compile(
    r"^arn:aws[a-z-]*:bedrock:[a-z0-9-]+:\d{12}:[a-z-]+/[A-Za-z0-9._:-]{1,200}$"
)
_PROFILE_PREFIX = re.compile(r"^[a-z]{2,8}$")
# Vertex publisher model ids: `claude-sonnet-4-5@20250929`.
_VERTEX_ID = re.compile(r"^[a-z0-9][a-z0-9.-]{0,120}(?:@[0-9]{8})?$")
_GCP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class CloudRequestError(ValueError):
    """The request cannot be sent to this cloud (an unmapped model, a bad id); a 400."""


class NotSupported(Exception):
    """The cloud has no such endpoint (count_tokens on Bedrock): answer 501 `not_supported`."""


@dataclass(frozen=True)
class CloudRequest:
    """What to send upstream: the path, the body (None: unchanged) and header changes."""

    path: str
    body: dict[str, Any] | None
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()


def beta_list(header: str | None) -> list[str]:
    """`anthropic-beta: a, b` -> ['a', 'b'] (the header is a comma list)."""
    return [part.strip() for part in (header or "").split(",") if part.strip()]


def _merge(first: Iterable[str], second: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in (*first, *second):
        seen.setdefault(item, None)
    return list(seen)


# --------------------------------------------------------------------------- Bedrock


def bedrock_model_id(model: str, mapping: Mapping[str, str], profile_prefix: str | None) -> str:
    """The Bedrock id for a client's model: the mapping, else a Bedrock id as given.

    A bare `anthropic.` id gets the configured cross-region inference profile prefix
    (`us`, `eu`, `apac`, `global`): newer Claude models are served only through one.
    """
    model = mapping.get(model, model)
    if _BEDROCK_ARN.match(model):
        return model
    if not _BEDROCK_ID.match(model):
        raise CloudRequestError(
            f"model {model!r} has no Bedrock id: add it to the provider's model mapping"
        )
    if profile_prefix and model.startswith("anthropic."):
        return f"{profile_prefix}.{model}"
    return model


def bedrock_request(
    endpoint: str,
    payload: Mapping[str, Any],
    model_id: str,
    betas: Iterable[str],
    allowed: Collection[str] | None = BEDROCK_BETAS,
) -> CloudRequest:
    """Bedrock InvokeModel for a Messages request; count_tokens raises `NotSupported`.

    Betas (the header's and any already in the body) outside `allowed` are dropped;
    `allowed=None` keeps them all.
    """
    if endpoint != "messages":
        raise NotSupported("Bedrock has no count_tokens endpoint for Anthropic models")
    stream = payload.get("stream") is True
    action = "invoke-with-response-stream" if stream else "invoke"
    body = {k: v for k, v in payload.items() if k not in ("model", "stream")}
    body.setdefault("anthropic_version", BEDROCK_VERSION)
    in_body = body.get("anthropic_beta")
    merged = _merge(in_body if isinstance(in_body, list) else [], betas)
    if allowed is not None:
        merged = [beta for beta in merged if beta in allowed]
    body.pop("anthropic_beta", None)
    if merged:
        body["anthropic_beta"] = merged
    accept = EVENT_STREAM if stream else "application/json"
    return CloudRequest(
        path=f"/model/{quote(model_id, safe='')}/{action}",
        body=body,
        set_headers=(("accept", accept), ("content-type", "application/json")),
        remove_headers=("anthropic-beta", "anthropic-version"),
    )


# --------------------------------------------------------------------------- Vertex


def vertex_model_id(model: str, mapping: Mapping[str, str]) -> str:
    """The Vertex id (`claude-sonnet-4-5@20250929`) for a client's model."""
    model = mapping.get(model, model)
    if not _VERTEX_ID.match(model):
        raise CloudRequestError(
            f"model {model!r} is not a Vertex model id: add it to the provider's model mapping"
        )
    return model


def vertex_base_path(project: str, region: str) -> str:
    """`/v1/projects/{p}/locations/{r}/publishers/anthropic/models`; names are validated."""
    for name in (project, region):
        if not _GCP_NAME.match(name):
            raise CloudRequestError(f"{name!r} is not a Google Cloud project or region name")
    return f"/v1/projects/{project}/locations/{region}/publishers/anthropic/models"


def vertex_host(region: str) -> str:
    """The regional endpoint; `global` has no region prefix."""
    return (
        "aiplatform.googleapis.com" if region == "global" else f"{region}-aiplatform.googleapis.com"
    )


def vertex_request(
    endpoint: str, payload: Mapping[str, Any], model_id: str, project: str, region: str
) -> CloudRequest:
    """rawPredict / streamRawPredict; count_tokens goes to `count-tokens:rawPredict`."""
    base = vertex_base_path(project, region)
    body = dict(payload)
    if endpoint == "count_tokens":
        body["model"] = model_id
        return CloudRequest(path=f"{base}/count-tokens:rawPredict", body=body)
    body.pop("model", None)
    body.setdefault("anthropic_version", VERTEX_VERSION)
    action = "streamRawPredict" if payload.get("stream") is True else "rawPredict"
    return CloudRequest(
        path=f"{base}/{model_id}:{action}",
        body=body,
        remove_headers=("anthropic-version",),
    )


# --------------------------------------------------------------------------- Foundry, AWS platform


def foundry_request(endpoint: str, prefix: str) -> CloudRequest:
    """Foundry serves the Messages API under its base URL's path (`/anthropic`)."""
    suffix = "/v1/messages/count_tokens" if endpoint == "count_tokens" else "/v1/messages"
    return CloudRequest(path=f"{prefix}{suffix}", body=None)


def foundry_key_headers(key: str) -> dict[str, str]:
    """Foundry api-key auth: the endpoint reads `x-api-key`; `api-key` for older ones."""
    return {"x-api-key": key, "api-key": key}


def claude_platform_aws_request(endpoint: str, workspace_id: str | None) -> CloudRequest:
    """Claude Platform on AWS is the Anthropic API plus the workspace header."""
    suffix = "/v1/messages/count_tokens" if endpoint == "count_tokens" else "/v1/messages"
    headers = (("anthropic-workspace-id", workspace_id),) if workspace_id else ()
    return CloudRequest(path=suffix, body=None, set_headers=headers)


def check_profile_prefix(prefix: str) -> str:
    """Validate a cross-region inference profile prefix (config)."""
    if not _PROFILE_PREFIX.match(prefix):
        raise ValueError(
            f"{prefix!r} is not an inference profile prefix like 'us', 'eu' or 'global'"
        )
    return prefix
