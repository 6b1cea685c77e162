"""Parse and validate a request body once, before any policy looks at it.

Pure functions: bytes in, a `ParsedRequest` or a `BadRequest` out. The model
name is checked here because it is later copied into headers, metrics and
audit records: control bytes, CR/LF or an overlong name must be a clear 400,
never a 500 or an injected header.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.apis import Endpoint
from extproc.apis.clouds import CloudPath, to_messages_body
from extproc.errors import BadRequest

MAX_MODEL_LENGTH = 256
# Model ids in the wild: claude-opus-4-8, gpt-5-mini, us.anthropic.claude-3-5-sonnet-v2:0,
# accounts/fireworks/models/llama-v3, meta-llama/Llama-3.1-8B-Instruct@2024.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+\-]*")


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """What the worker process measured of a heavy body, so the event loop never walks
    it (extproc/offload.py): the body's big top-level values stay serialized
    (`orjson.Fragment`s in `ParsedRequest.body`, their bytes in `parts`)."""

    parts: dict[str, bytes]  # top-level key -> its value's JSON, as forwarded
    digests: dict[str, Any]  # top-level key -> what a cache key holds for it (cache.key)
    input_tokens: int  # the dialect's estimate, made on the whole body
    changed: bool  # the guard's redaction changed the body (already applied in `parts`)
    shape: Any = None  # the cache hygiene shape (cache.Shape), when the body is small enough


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str | None
    stream: bool
    worker: WorkerFacts | None = None

    def key_body(self) -> dict[str, Any]:
        """The body as a cache key sees it: the worker's digests for the values it left
        serialized (hashing them again here would pause the event loop)."""
        if self.worker is None:
            return self.body
        digests = self.worker.digests
        return {k: digests.get(k, v) for k, v in self.body.items()}

    def full_body(self) -> dict[str, Any]:
        """The body with every value the worker left serialized parsed: a pause on the
        event loop as long as the parse, for the rare step that must walk all of it."""
        if self.worker is None:
            return self.body
        parts = self.worker.parts
        return {k: orjson.loads(parts[k]) if k in parts else v for k, v in self.body.items()}


def parse_json_object(raw: bytes, *, check_keys: bool = True) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", reason="invalid_json") from exc
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object", reason="invalid_json")
    if check_keys:
        check_unique_keys(raw, value)
    return value


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def check_unique_keys(raw: bytes, parsed: Any) -> None:
    """`BadRequest` naming the key when an object in `raw` repeats one.

    orjson keeps the last of two equal keys, so the gateway would check one value while
    the provider (which sees the bytes) may use the other. Re-encoding the parsed value
    drops every repeated key, so:

    - a body that re-encodes to its own bytes has none (compact JSON as JavaScript's
      `JSON.stringify` writes it, e.g. Claude Code's: ~50 µs for 117 KB, mostly the
      encoding);
    - otherwise, every key is followed by a colon and every other colon is inside a
      string, so equal colon counts prove the keys unique (another ~100 µs);
    - only an escaped colon (`\\u003a`) or a count that differs takes the slow exact
      check that names the key.
    """
    try:
        again = orjson.dumps(parsed)
    except orjson.JSONEncodeError:
        again = b""
    if again == raw:
        return
    if again and b"\\u003" not in raw and raw.count(b":") == again.count(b":"):
        return
    try:
        json.loads(raw, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        shown = dup.key if len(dup.key) <= 64 else dup.key[:64] + "..."
        raise BadRequest(
            f"request body repeats the key {shown!r} in one object; send each key once",
            reason="duplicate_key",
        ) from None
    except ValueError:
        return  # orjson accepted it; any difference in dialect is not a duplicate


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


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


def parse_request(
    raw: bytes, endpoint: Endpoint, *, check_keys: bool = True, model_in_body: bool = True
) -> ParsedRequest:
    """`check_keys=False`: the duplicate-key check was already done (in the worker).
    `model_in_body=False`: the caller's dialect names the model in the URL, so the body
    need not (its `model`, if any, is still checked)."""
    body = parse_json_object(raw, check_keys=check_keys)
    required = endpoint.generates and model_in_body
    model = check_model(body.get("model")) if "model" in body or required else None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", reason="invalid_stream")
    return ParsedRequest(body=body, model=model, stream=stream and endpoint.generates)


def parse_cloud_request(
    raw: bytes, endpoint: Endpoint, where: CloudPath, *, check_keys: bool = True
) -> ParsedRequest:
    """A Bedrock or Vertex client's body, made canonical Anthropic Messages (the URL's
    model, Bedrock's streaming by path), then checked like any other."""
    body = to_messages_body(parse_json_object(raw, check_keys=check_keys), where)
    model = check_model(body.get("model"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", reason="invalid_stream")
    return ParsedRequest(body=body, model=model, stream=stream and endpoint.generates)
