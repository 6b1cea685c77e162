"""AWS Signature Version 4 for one request with a JSON body: a small pure implementation.

botocore's `SigV4Auth` costs ~185 µs per request here beyond hashing the body (it builds an
`AWSRequest`, copies headers, normalises the URL); this costs ~15 µs, and caches the derived
signing key for the day. The tests check every signature with botocore as the oracle
(tests/cloud_fakes.py `verify_sigv4`), so the two cannot drift apart unnoticed.

Only `host`, `content-type`, `x-amz-date` and (with temporary credentials)
`x-amz-security-token` are signed: headers Envoy adds on the way out cannot break it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
BEDROCK_SERVICE = "bedrock"
# Claude Platform on AWS signs for this service name (its IAM actions are
# `aws-external-anthropic:*`; endpoint https://aws-external-anthropic.<region>.api.aws).
CLAUDE_PLATFORM_SERVICE = "aws-external-anthropic"


class AwsKeys(NamedTuple):
    """A key pair and, for temporary credentials, the session token."""

    access_key: str
    secret_key: str
    token: str | None


class FrozenCredentials(Protocol):
    """botocore's `ReadOnlyCredentials` (what the credential chain hands out)."""

    @property
    def access_key(self) -> str | None: ...
    @property
    def secret_key(self) -> str | None: ...
    @property
    def token(self) -> str | None: ...


def sign_with(
    credentials: FrozenCredentials,
    service: str,
    region: str,
    method: str,
    url: str,
    body: bytes,
    content_type: str = "application/json",
) -> dict[str, str]:
    """`sign` with credentials from the chain."""
    keys = AwsKeys(credentials.access_key or "", credentials.secret_key or "", credentials.token)
    return sign(keys, service, region, method, url, body, content_type)


@functools.lru_cache(maxsize=64)
def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _canonical_query(query: str) -> str:
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def sign(
    keys: AwsKeys,
    service: str,
    region: str,
    method: str,
    url: str,
    body: bytes,
    content_type: str = "application/json",
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """The headers that sign this request: authorization, x-amz-date, x-amz-security-token.

    `url` carries the path exactly as it will be sent (already percent-encoded, e.g.
    `%3A` in a Bedrock model id); SigV4 encodes it once more for the canonical request.
    """
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    date = when[:8]
    parts = urlsplit(url)
    headers = {"content-type": content_type, "host": parts.netloc, "x-amz-date": when}
    if keys.token:
        headers["x-amz-security-token"] = keys.token
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join(
        (
            method,
            quote(parts.path or "/", safe="/~"),
            _canonical_query(parts.query),
            "".join(f"{n}:{headers[n].strip()}\n" for n in names),
            signed,
            hashlib.sha256(body).hexdigest(),
        )
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = f"{ALGORITHM}\n{when}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _signing_key(keys.secret_key, date, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {
        "authorization": (
            f"{ALGORITHM} Credential={keys.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        ),
        "x-amz-date": when,
    }
    if keys.token:
        out["x-amz-security-token"] = keys.token
    return out
