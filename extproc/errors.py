"""The gateway's user-facing errors: one hierarchy, turned into a response in one place.

Every rejection the gateway makes is a `GatewayError` subclass carrying the
HTTP status, a short machine `reason` (the metric label and audit outcome) and a
message that tells the caller what to fix. `extproc.stream` renders it in the
caller's API shape (Anthropic or OpenAI JSON) via `extproc.apis.error_response`, in one
place: `RequestStream._refuse`, which also maps store errors and unexpected exceptions.
Errors from third-party libraries (redis, grpc) are mapped to these at the
boundary with `raise ... from`.

    GatewayError
    ├── BadRequest            400  malformed JSON, bad field, unsafe header value
    ├── Unauthorized          401  missing / unknown / expired gateway key
    ├── Forbidden             403  model or route not allowed
    ├── NotFound              404  path the gateway does not serve
    ├── MethodNotAllowed      405
    ├── PayloadTooLarge       413  body over limits.max_body_bytes (decoded size)
    ├── UnsupportedEncoding   415  a request Content-Encoding the gateway does not decode
    ├── RateLimited           429  budget, quota or rate limit exhausted
    ├── HeadersTooLarge       431  request headers over the gateway's bound
    ├── InternalError         500  an unexpected failure inside the gateway (a bug; logged)
    ├── AnswerWithheld        502  the answer was withheld (output policy, unreadable)
    ├── Unavailable           503  a dependency (store) is down and policy fails closed
    └── GatewayTimeout        504  the provider sent nothing within the first-byte timeout

`retryable` says whether the same request could succeed if sent again. The SDKs and
Claude Code retry 401s, 429s and 5xx up to ten times with backoff unless the answer
says `x-should-retry: false`, so every refusal a retry cannot fix must say so: a wrong
key otherwise hangs the CLI for minutes. It is a class attribute (4xx refusals: no;
rate limits and outages: yes) that a raise site may override (an exhausted budget is
a 429 that no retry within minutes can fix).
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    reason = "internal"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if retryable is not None:
            self.retryable = retryable
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


class UnsupportedEncoding(GatewayError):
    status = 415
    reason = "unsupported_encoding"


class RateLimited(GatewayError):
    status = 429
    reason = "rate_limited"
    retryable = True


class HeadersTooLarge(GatewayError):
    status = 431
    reason = "headers_too_large"


class InternalError(GatewayError):
    """An unexpected exception, answered in the caller's shape rather than failing the
    RPC (which Envoy would turn into its own 500 or let through unguarded)."""

    status = 500
    reason = "internal"


class AnswerWithheld(GatewayError):
    status = 502
    reason = "output_blocked"


class NotSupported(GatewayError):
    """The serving provider has no such endpoint (count_tokens on Bedrock)."""

    status = 501
    reason = "not_supported"


class Unavailable(GatewayError):
    status = 503
    reason = "unavailable"
    retryable = True


class GatewayTimeout(GatewayError):
    status = 504
    reason = "upstream_timeout"
    retryable = True  # a hung provider is usually a passing fault
