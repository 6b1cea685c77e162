"""Every gateway refusal is rendered in one place: status, error type, retry advice."""

from __future__ import annotations

import orjson
import pytest

from extproc.apis import error_response
from extproc.errors import (
    AnswerWithheld,
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnsupportedEncoding,
)

CASES = [
    (BadRequest("x"), 400, "invalid_request_error", "invalid_request_error", "false"),
    (Unauthorized("x"), 401, "authentication_error", "authentication_error", "false"),
    (Forbidden("x"), 403, "permission_error", "permission_error", "false"),
    (NotFound("x"), 404, "not_found_error", "not_found_error", "false"),
    (MethodNotAllowed("x"), 405, "invalid_request_error", "invalid_request_error", "false"),
    (PayloadTooLarge("x"), 413, "request_too_large", "invalid_request_error", "false"),
    (UnsupportedEncoding("x"), 415, "invalid_request_error", "invalid_request_error", "false"),
    (RateLimited("x"), 429, "rate_limit_error", "rate_limit_error", "true"),
    (
        RateLimited("x", reason="budget_exhausted", retryable=False),
        429,
        "rate_limit_error",
        "rate_limit_error",
        "false",
    ),
    (AnswerWithheld("x"), 502, "api_error", "server_error", "false"),
    (
        Unavailable("x", reason="store_down"),
        503,
        "overloaded_error",
        "service_unavailable_error",
        "true",
    ),
    (
        Unavailable("x", reason="no_provider", retryable=False),
        503,
        "overloaded_error",
        "service_unavailable_error",
        "false",
    ),
]


@pytest.mark.parametrize(("error", "status", "anthropic_type", "openai_type", "retry"), CASES)
def test_every_refusal_says_its_type_reason_and_whether_to_retry(
    error: GatewayError, status: int, anthropic_type: str, openai_type: str, retry: str
) -> None:
    for api, kind in (("anthropic", anthropic_type), ("openai", openai_type)):
        response = error_response(api, error, "req-1")  # type: ignore[arg-type]
        headers = dict(response.headers)
        assert response.status == status
        assert orjson.loads(response.body)["error"]["type"] == kind
        assert headers["x-should-retry"] == retry
        assert headers["x-gateway-error"] == error.reason
        assert headers["x-gateway-request-id"] == "req-1"
