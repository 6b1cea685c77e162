"""The gateway's user-facing errors: one hierarchy, turned into a response in one place.

Every rejection the gateway makes is a `GatewayError` subclass carrying the
HTTP status, a short machine `reason` (the metric label and audit outcome) and a
message that tells the caller what to fix. `extproc.stream` renders it in the
caller's API shape (Anthropic or OpenAI JSON) via `extproc.apis.error_response`.
Errors from third-party libraries (redis, grpc) are mapped to these at the
boundary with `raise ... from`.

    GatewayError
    ├── BadRequest            400  malformed JSON, bad field, unsafe header value
    ├── Unauthorized          401  missing / unknown / expired gateway key
    ├── Forbidden             403  model or route not allowed
    ├── NotFound              404  path the gateway does not serve
    ├── MethodNotAllowed      405
    ├── PayloadTooLarge       413  body over limits.max_body_bytes
    ├── RateLimited           429  budget, quota or rate limit exhausted
    ├── Unavailable           503  a dependency (store) is down and policy fails closed
    └── GatewayTimeout        504  the provider sent nothing within the first-byte timeout
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    reason = "internal"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.headers = headers


class BadRequest(GatewayError):
    status = 400
    reason = "bad_request"


class Unauthorized(GatewayError):
    status = 401
    reason = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    reason = "forbidden"


class NotFound(GatewayError):
    status = 404
    reason = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    reason = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    reason = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    reason = "rate_limited"


class Unavailable(GatewayError):
    status = 503
    reason = "unavailable"


class GatewayTimeout(GatewayError):
    status = 504
    reason = "upstream_timeout"
