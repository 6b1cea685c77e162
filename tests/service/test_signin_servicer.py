"""Sign-in endpoints through the servicer: immediate responses in the right phase, one
audit record each, nothing forwarded."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.signin.tokens import Session
from extproc.telemetry.metrics import Metrics
from tests.service.test_servicer import ListSink, request_body, request_headers, run

SETTINGS = {"availableModels": ["sonnet"]}


@pytest.fixture
def gateway(sink: ListSink) -> Gateway:
    config: Any = {
        "providers": {"main": {"api": "anthropic", "base_url": "https://llm.internal"}},
        "auth": {"required": True},
        "sso": {
            "oidc": {
                "issuer": "https://idp.test",
                "client_id": "c",
                "client_secret": {"value": "s"},
            },
            "groups": [{"group": "eng", "settings": SETTINGS}],
        },
    }
    return Gateway.from_config(parse_config(config), metrics=Metrics(), audit=sink)


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


async def test_token_poll_is_answered_in_the_body_phase(gateway: Gateway, sink: ListSink) -> None:
    form = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code=x"
    replies = await run(
        ExternalProcessor(gateway),
        [request_headers("/oauth/token?via=cli"), request_body(form)],
    )
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "immediate_response"]
    answer = replies[1].immediate_response
    assert answer.status.code == 400
    assert orjson.loads(answer.body)["error"] == "invalid_grant"
    (record,) = sink.records
    assert (record["outcome"], record["path"], record["status"]) == ("signin", "/oauth/token", 400)


async def test_managed_settings_and_otlp_with_a_signed_in_user(
    gateway: Gateway, sink: ListSink
) -> None:
    assert gateway.signin is not None
    token = gateway.signin.signer.mint(Session("ana", None, ("eng",), "sid"))
    bearer = {"authorization": f"Bearer {token}"}
    servicer = ExternalProcessor(gateway)
    replies = await run(servicer, [request_headers("/managed/settings", "GET", True, bearer)])
    answer = replies[0].immediate_response
    assert answer.status.code == 200
    assert orjson.loads(answer.body)["settings"] == SETTINGS
    otlp = {**bearer, "content-type": "application/json"}
    replies = await run(servicer, [request_headers("/v1/logs", extra=otlp), request_body(b"{}")])
    assert replies[-1].immediate_response.status.code == 200
    assert [r["outcome"] for r in sink.records] == ["managed_settings", "otlp"]
    assert all(r["identity"] == "sso" and r["user"] == "ana" for r in sink.records)
