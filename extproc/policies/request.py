"""Parse and validate a request body once, before any policy looks at it.

Pure functions: bytes in, a `ParsedRequest` or a `BadRequest` out. The model
name is checked here because it is later copied into headers, metrics and
audit records: control bytes, CR/LF or an overlong name must be a clear 400,
never a 500 or an injected header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.apis import Endpoint
from extproc.errors import BadRequest

MAX_MODEL_LENGTH = 256
# Model ids in the wild: claude-opus-4-8, gpt-5-mini, us.anthropic.claude-3-5-sonnet-v2:0,
# accounts/fireworks/models/llama-v3, meta-llama/Llama-3.1-8B-Instruct@2024.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+\-]*")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str | None
    stream: bool


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", reason="invalid_json") from exc
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object", reason="invalid_json")
    return value


def check_model(model: object) -> str:
    """A model name that is safe to put in a header; `BadRequest` otherwise."""
    if model is None:
        raise BadRequest("'model' is required", reason="invalid_model")
    if not isinstance(model, str):
        raise BadRequest(
            f"'model' must be a string, not {type(model).__name__}", reason="invalid_model"
        )
    if not model:
        raise BadRequest("'model' must not be empty", reason="invalid_model")
    if len(model) > MAX_MODEL_LENGTH:
        raise BadRequest(
            f"'model' is {len(model)} characters; at most {MAX_MODEL_LENGTH} are allowed",
            reason="invalid_model",
        )
    if not _MODEL.fullmatch(model):
        raise BadRequest(
            "'model' may contain only letters, digits and . _ : / @ + - "
            "(no spaces, control characters or line breaks)",
            reason="invalid_model",
        )
    return model


def parse_request(raw: bytes, endpoint: Endpoint) -> ParsedRequest:
    body = parse_json_object(raw)
    model = check_model(body.get("model")) if "model" in body or endpoint.generates else None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", reason="invalid_stream")
    return ParsedRequest(body=body, model=model, stream=stream and endpoint.generates)
