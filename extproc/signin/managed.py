"""`GET /managed/settings`: a group's Claude Code managed settings, with ETag/304.

The checksum is the one the client computes itself (the gateway protocol): `sha256:`
and the hex SHA-256 of the settings as JSON with keys sorted at every level and no
whitespace. It is the `checksum` field and, quoted, the ETag; a matching
`If-None-Match` gets 304. Policies without settings answer 404 ("no managed policy"),
which is not the same as 200 with `{}` (an empty policy).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from extproc.decisions import Respond

_NAMESPACE = uuid.UUID("6f1c2d4e-8a51-4f7b-9a57-2b0d3c1e9f10")


def checksum(settings: Mapping[str, Any]) -> str:
    canonical = orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def answer(group: str, settings: Mapping[str, Any] | None, if_none_match: str | None) -> Respond:
    headers: tuple[tuple[str, str], ...] = (("cache-control", "private, no-cache"),)
    if settings is None:
        body = b'{"type":"error","error":{"type":"not_found_error","message":"no managed policy"}}'
        return Respond(404, body, (("content-type", "application/json"), *headers), "extproc_sso")
    sum_ = checksum(settings)
    etag = f'"{sum_}"'
    headers += (("etag", etag),)
    if if_none_match is not None and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Respond(304, b"", headers, "extproc_sso")
    document = {"uuid": str(uuid.uuid5(_NAMESPACE, group)), "checksum": sum_, "settings": settings}
    return Respond(
        200, orjson.dumps(document), (("content-type", "application/json"), *headers), "extproc_sso"
    )
