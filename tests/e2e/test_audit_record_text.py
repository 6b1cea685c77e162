"""Per-route `record_text` through real Envoy: the route metadata of
envoy/two-personality.yaml picks the profile; the agent route is a compliance route
(prompts and answers kept), the advisor route has zero data retention (metadata only)
although the global `audit.record_text` is on."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
import yaml

from extproc.policies.auth import hash_key, new_key
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

ROOT = Path(__file__).resolve().parents[2]
KEY = new_key("ci")
MESSAGES: Any = [{"role": "user", "content": "the secret plan"}]


@pytest.fixture(scope="module")
def stack(fake: FakeProvider) -> Iterator[Stack]:
    config = yaml.safe_load((ROOT / "examples" / "two-personality.yaml").read_text())
    config.update({k: v for k, v in gateway_config(fake.url).items() if k != "providers"})
    config["envoy"]["bootstrap"] = str(ROOT / "envoy" / "two-personality.yaml")
    for provider in config["providers"].values():
        provider.update(base_url=fake.url, credential={"value": "sk-held"})
    config["auth"]["keys"][0]["hash"] = hash_key(KEY)
    config["profiles"]["agent"]["audit"] = {"record_text": True}
    config["profiles"]["advisor"]["zero_data_retention"] = True
    workdir = Path(tempfile.mkdtemp(prefix="extproc-test-"))
    # The global default says: keep text.
    config["audit"] = {"sink": str(workdir / "audit.jsonl"), "record_text": True}
    stack = Stack(config, workdir=workdir)
    stack.start()
    yield stack
    stack.close()


def ask(stack: Stack, personality: str, model: str, stream: bool) -> str:
    client = anthropic.Anthropic(
        api_key=KEY,
        base_url=stack.url,
        max_retries=0,
        default_headers={"x-claude-personality": personality},
    )
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=5, messages=MESSAGES, stream=stream
    )
    if stream:
        for _ in raw.parse():
            pass
    return raw.headers["x-gateway-request-id"]


@pytest.mark.parametrize("stream", [False, True])
def test_compliance_route_keeps_prompt_and_answer(stack: Stack, stream: bool) -> None:
    record = record_for(stack, ask(stack, "agent", "claude-opus-4-8", stream))
    assert record["route"] == "agent"
    assert record["prompt"] == {"messages": MESSAGES}
    assert "Hello from the fake provider" in orjson.dumps(record["completion"]).decode()


@pytest.mark.parametrize("stream", [False, True])
def test_zero_data_retention_route_keeps_metadata_only(stack: Stack, stream: bool) -> None:
    record = record_for(stack, ask(stack, "advisor", "claude-sonnet-4-6", stream))
    assert record["route"] == "advisor"
    assert record["outcome"] == "ok"
    assert record["output_tokens"] > 0
    text = orjson.dumps(record).decode()
    assert "the secret plan" not in text
    assert "Hello from the fake provider" not in text
    assert "prompt" not in record
    assert "completion" not in record
