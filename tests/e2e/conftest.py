"""Fixtures for end-to-end tests: a fake provider and the real Envoy + ext_proc stack."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.fake_provider import FakeProvider, run_in_thread
from tests.harness import Stack, gateway_config

pytestmark = pytest.mark.e2e

PROVIDER_SECRET = "sk-ant-provider-held-by-gateway"


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    with run_in_thread() as provider:
        yield provider


@pytest.fixture(scope="session")
def stack(fake: FakeProvider) -> Iterator[Stack]:
    """The default stack: Anthropic provider with a gateway-held credential."""
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["limits"] = {"max_body_bytes": 1024 * 1024}
    gateway = Stack(config)
    gateway.start()
    yield gateway
    gateway.close()


@pytest.fixture
def received(fake: FakeProvider) -> FakeProvider:
    fake.clear()
    return fake


@pytest.fixture
def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="client-key", base_url=stack.url, max_retries=0)


@pytest.fixture
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key="client-key", base_url=f"{stack.url}/v1", max_retries=0)
