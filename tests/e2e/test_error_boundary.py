"""One error boundary (issue 10 item 2): a refused answer is one provider call, in the
caller's shape, audited with the status the caller got.

The official SDKs retry any status >= 500 unless the answer says `x-should-retry: false`;
each retry would be another billed provider call. These run the SDKs with their default
retries and count what reached the provider.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.e2e.conftest import PROVIDER_SECRET
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

pytestmark = pytest.mark.e2e

BLOCKED_TEXT = "run rm -rf / now"


@pytest.fixture(scope="module")
def guarded(fake: FakeProvider) -> Iterator[Stack]:
    """An output policy that withholds any answer saying `rm -rf /`."""
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["providers"]["openai"]["credential"] = {"value": PROVIDER_SECRET}
    deny = [{"id": "no_rm_rf", "phrase": "rm -rf /", "action": "block"}]
    config["guard"] = {"profiles": {"default": {"output": {"deny": deny}}}}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _calls(fake: FakeProvider, path: str) -> int:
    return sum(1 for r in fake.received if r.path == path)


def test_anthropic_sdk_makes_one_provider_call_when_the_answer_is_withheld(
    guarded: Stack, received: FakeProvider
) -> None:
    client = anthropic.Anthropic(api_key="client-key", base_url=guarded.url)  # default retries
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-text": BLOCKED_TEXT},
        )
    response = caught.value.response
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert response.headers["x-gateway-error"] == "output_blocked"
    assert response.headers["x-should-retry"] == "false"
    assert _calls(received, "/v1/messages") == 1
    record = record_for(guarded, response.headers["x-gateway-request-id"])
    assert record["status"] == 502  # what the caller got, not the provider's 200
    assert record["outcome"] == "error"
    assert record["error_type"] == "output_blocked"
    assert record["output_tokens"] > 0  # the provider's work is still accounted


def test_openai_sdk_makes_one_provider_call_when_the_answer_is_withheld(
    guarded: Stack, received: FakeProvider
) -> None:
    client = openai.OpenAI(api_key="client-key", base_url=f"{guarded.url}/v1")
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="gpt-5",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-text": BLOCKED_TEXT},
        )
    response = caught.value.response
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "output_blocked"
    assert response.headers["x-gateway-error"] == "output_blocked"
    assert response.headers["x-should-retry"] == "false"
    assert _calls(received, "/v1/chat/completions") == 1
    record = record_for(guarded, response.headers["x-gateway-request-id"])
    assert (record["status"], record["outcome"]) == (502, "error")


def test_a_withheld_stream_ends_with_an_error_event_after_one_call(
    guarded: Stack, received: FakeProvider
) -> None:
    client = anthropic.Anthropic(api_key="client-key", base_url=guarded.url)
    stream = client.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=20,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-text": BLOCKED_TEXT},
    )
    with pytest.raises(anthropic.APIStatusError, match="output policy"), stream as events:
        for _ in events:
            pass
    assert _calls(received, "/v1/messages") == 1
