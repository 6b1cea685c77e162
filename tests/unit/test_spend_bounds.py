"""Pure spend bounds: the output cap, the estimate of a stream cut short, who is counted."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.apis.openai import UsageChunkDropper
from extproc.apis.usage import Usage
from extproc.policies.auth import Identity
from extproc.policies.budget.spending import (
    cap_output,
    client_address,
    cut_short_usage,
    pipeline_namespace,
    requested_output,
    tokens_for_bytes,
)


@pytest.mark.parametrize(
    ("body", "reserved"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_tokens": 5000}, 1000),
        ({}, 1000),
        ({"max_completion_tokens": 10, "n": 4}, 40),
        ({"max_tokens": 10, "n": True}, 10),  # a bool is not a count
        ({"max_tokens": True}, 1000),
    ],
)
def test_reservation_covers_everything_the_request_may_generate(
    body: dict[str, Any], reserved: int
) -> None:
    capped = dict(body)
    cap_output(capped, 1000, "openai")
    assert requested_output(capped, 1000) == reserved


def test_cap_leaves_a_request_within_the_cap_untouched() -> None:
    body = {"max_tokens": 10, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert not cap_output(body, 1000, "anthropic")
    assert body == {"max_tokens": 10, "thinking": {"type": "enabled", "budget_tokens": 1024}}


def test_one_token_estimate_rounds_up() -> None:
    assert [tokens_for_bytes(n) for n in (0, 1, 3, 4, -5)] == [0, 1, 1, 2, 0]


def test_cut_short_usage_never_bills_less_than_the_provider_said() -> None:
    seen = Usage(input_tokens=20, output_tokens=50)
    assert cut_short_usage(seen, 999, content_bytes=30) == Usage(20, 50)
    assert cut_short_usage(Usage(), 7, content_bytes=31) == Usage(7, 11)
    cached = Usage(cache_read_input_tokens=100)
    assert cut_short_usage(cached, 999, 0).input_tokens == 0  # reported: no estimate


def test_client_address_is_the_entry_envoy_appended() -> None:
    headers = {"x-forwarded-for": "1.1.1.1, 2.2.2.2 ,3.3.3.3"}
    assert client_address(headers, 0) == "3.3.3.3"
    assert client_address(headers, 1) == "2.2.2.2"
    assert client_address(headers, 5) is None
    assert client_address({}, 0) is None


def test_pipeline_namespace_prefers_the_team() -> None:
    assert pipeline_namespace(Identity("key", key_id="k", team="red")) == "red"
    assert pipeline_namespace(Identity("key", key_id="k", project="p")) == "project:p"
    assert pipeline_namespace(Identity("key", key_id="k")) == "key:k"
    assert pipeline_namespace(Identity("jwt", user="u@x")) == "user:u@x"


def test_usage_chunk_dropper_handles_any_split_and_line_ending() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    for size in (1, 2, 7, len(stream)):
        dropper = UsageChunkDropper()
        out = b"".join(dropper.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        out += dropper.close()
        assert out == b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\ndata: [DONE]\n\n'
        assert dropper.dropped == 1
