"""Replies shared between requests (extproc.envoy_api.to_response): the same message as
one built afresh, and only for decisions that repeat."""

from __future__ import annotations

from extproc.decisions import BodyMode, Continue, HeaderChanges
from extproc.envoy_api import _render, to_response
from extproc.phases import Phase


def _forward(key: str = "sk-ant-1") -> Continue:
    headers = HeaderChanges(set=(("x-gateway-cluster", "p"), ("x-api-key", key)), remove=("a",))
    return Continue(headers=headers, clear_route_cache=True)


def test_a_repeated_request_side_reply_is_shared_and_the_same_as_built_afresh() -> None:
    first = to_response(Phase.REQUEST_BODY, _forward())
    assert to_response(Phase.REQUEST_BODY, _forward()) is first  # equal, distinct decisions
    assert first == _render(Phase.REQUEST_BODY, _forward())
    other = to_response(Phase.REQUEST_BODY, _forward("sk-ant-2"))
    assert other is not first
    assert other == _render(Phase.REQUEST_BODY, _forward("sk-ant-2"))
    assert to_response(Phase.REQUEST_HEADERS, _forward()) is not first


def test_replies_with_a_body_metadata_or_on_the_response_side_are_built_each_time() -> None:
    body = Continue(body=b"{}", headers=HeaderChanges(set=(("content-length", "2"),)))
    metadata = Continue(dynamic_metadata={"model": "m"})
    answer = Continue(
        headers=HeaderChanges(set=(("x-gateway-request-id", "r"),)),
        response_body_mode=BodyMode.BUFFERED,
    )
    for phase, decision in (
        (Phase.REQUEST_BODY, body),
        (Phase.REQUEST_BODY, metadata),
        (Phase.RESPONSE_HEADERS, answer),
    ):
        reply = to_response(phase, decision)
        assert reply is not to_response(phase, decision)
        assert reply == _render(phase, decision)
