"""Each ProcessingRequest becomes one frozen event value (issue 10 item 1)."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import envoy_api
from extproc.phases import (
    Phase,
    RequestBody,
    RequestHeaders,
    ResponseBody,
    ResponseHeaders,
    Trailers,
)


def _headers(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=eos)


def test_each_message_is_one_frozen_event() -> None:
    head = envoy_api.event_of(pb.ProcessingRequest(request_headers=_headers({":path": "/x"})))
    assert isinstance(head, RequestHeaders)
    assert (head.phase, head.headers, head.end_of_stream) == (
        Phase.REQUEST_HEADERS,
        {":path": "/x"},
        False,
    )
    body = envoy_api.event_of(
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b"{}", end_of_stream=True))
    )
    assert body == RequestBody(b"{}", True)
    answer = envoy_api.event_of(
        pb.ProcessingRequest(response_headers=_headers({":status": "200"}, eos=True))
    )
    assert answer == ResponseHeaders({":status": "200"}, True, details="")
    chunk = envoy_api.event_of(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"a")))
    assert chunk == ResponseBody(b"a", False)
    trailers = envoy_api.event_of(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    assert trailers == Trailers(Phase.REQUEST_TRAILERS)
    assert envoy_api.event_of(pb.ProcessingRequest()) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        chunk.body = b"b"  # type: ignore[misc]
