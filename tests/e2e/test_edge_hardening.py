"""The edge through the real Envoy: slowloris, path tricks, failure modes, label bounds.

Regression tests for issue 11 items 13-17: connections that never finish their headers
are closed by Envoy's request-header timeout while a legitimate request still gets
through; normalised and refused paths never reach the provider with its credential;
failing open never forwards a gateway key, failing closed answers a plain 503 in the
caller's shape whether ext_proc is dead or hung. (That rejected requests add no metric
series needs no Envoy: tests/service/test_label_bounds.py.)
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc.envoy_config import max_connections
from extproc.policies.auth import hash_key, new_key
from tests.e2e.conftest import PROVIDER_SECRET
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config, running

BODY = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
HEADERS = {"anthropic-version": "2023-06-01"}
KEY = new_key("alice")


def _hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _ext_proc(bootstrap: dict[str, Any]) -> dict[str, Any]:
    found = (f for f in _hcm(bootstrap)["http_filters"] if f["name"].endswith("ext_proc"))
    config: dict[str, Any] = next(found)["typed_config"]
    return config


@pytest.fixture
def keyed(fake: FakeProvider) -> Iterator[Stack]:
    """A stack with gateway keys swapped for the provider credentials."""
    config = gateway_config(fake.url)
    for provider in config["providers"].values():
        provider["credential"] = {"value": PROVIDER_SECRET}
    config["auth"] = {"required": True, "keys": [{"id": "alice", "hash": hash_key(KEY)}]}
    stack = Stack(config)
    yield stack
    stack.close()


# --------------------------------------------------------------------------- 13 slowloris


def _half_open(stack: Stack, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((stack.config.listen.host, stack.config.listen.port))
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: gateway\r\nx-api-key: gwk_")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def _closed(sock: socket.socket) -> bool:
    try:
        while data := sock.recv(4096):
            del data
        return True  # EOF: Envoy closed it
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_unfinished_headers_are_timed_out_and_others_still_served(
    stack: Stack, fake: FakeProvider
) -> None:
    """200 connections that never finish their headers (the shipped timeout is 10 s; this
    Envoy runs the same bootstrap with 2 s) are closed by Envoy, not held open, and a
    legitimate request meanwhile gets its answer."""
    bootstrap = stack.bootstrap()
    assert _hcm(bootstrap)["request_headers_timeout"] == "10s"
    assert max_connections(bootstrap) is not None
    slow = Stack(stack.data)
    _hcm(patched := slow.bootstrap())["request_headers_timeout"] = "2s"
    slow.start_extproc()
    slow.start_envoy(patched)
    sockets: list[socket.socket] = []
    try:
        started = time.monotonic()
        sockets = _half_open(slow, 200)
        reply = httpx.post(
            f"{slow.url}/v1/messages", json=BODY, headers={**HEADERS, "x-api-key": "k"}, timeout=10
        )
        assert reply.status_code == 200
        open_ = list(sockets)
        deadline = time.monotonic() + 20
        while open_ and time.monotonic() < deadline:
            open_ = [s for s in open_ if not _closed(s)]
            time.sleep(0.1)
        assert not open_, f"{len(open_)} of 200 half-open connections still open"
        assert time.monotonic() - started >= 1.5  # closed by the timeout, not refused
    finally:
        for sock in sockets:
            sock.close()
        slow.close()


# --------------------------------------------------------------------------- memory


# --------------------------------------------------------------------------- 15 paths

TRICKS = [
    "/v1/models/..%2F..%2Fv1%2Ffiles",
    "/v1/models/..",
    "/v1/models/%2e%2e",
    "/v1/models/..;",
    "/v1/models/%2e%2e/files",
    "/v1/models/..%5Cfiles",
    "/v1//models/../files",
    "/v1/models/x/../../files",
]


@pytest.mark.parametrize("path", TRICKS)
def test_path_tricks_never_reach_the_provider(
    stack: Stack, received: FakeProvider, path: str
) -> None:
    connection = http.client.HTTPConnection(stack.config.listen.host, stack.config.listen.port)
    try:
        connection.request("GET", path, headers={**HEADERS, "x-api-key": "k"})
        reply = connection.getresponse()
        body = reply.read()
    finally:
        connection.close()
    assert reply.status in (400, 404), (reply.status, body)
    assert received.received == []


def test_a_get_with_a_body_still_checks_model_visibility(fake: FakeProvider) -> None:
    config = gateway_config(fake.url, profiles={"default": {"models": ["claude-haiku-*"]}})
    with running(config) as stack:
        fake.clear()
        reply = httpx.request(
            "GET",
            f"{stack.url}/v1/models/claude-opus-4-8",
            content=b'{"model": "claude-haiku-4-5"}',
            headers={**HEADERS, "x-api-key": "k", "content-type": "application/json"},
            timeout=10,
        )
        assert reply.status_code == 404
        assert fake.received == []


def test_options_asterisk_logs_nothing(stack: Stack) -> None:
    """Envoy answers `OPTIONS *` itself; the gateway sees only that reply and stays quiet."""
    for _ in range(3):
        with socket.create_connection((stack.config.listen.host, stack.config.listen.port)) as s:
            s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 4")
    # A later request's audit record is written after any log line of those streams.
    count = len(stack.audit_records())
    headers = {**HEADERS, "x-api-key": "k"}
    assert httpx.post(f"{stack.url}/v1/messages", json=BODY, headers=headers).status_code == 200
    stack.audit_records(wait_for=count + 1)
    assert "protocol error" not in stack.log_text("extproc")


# --------------------------------------------------------------------------- 16 failure modes


SSO_TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def _post_with_key(stack: Stack) -> httpx.Response:
    headers = {**HEADERS, "x-api-key": KEY}
    return httpx.post(f"{stack.url}/v1/messages", json=BODY, headers=headers, timeout=30)


def _openai_with_key(stack: Stack) -> httpx.Response:
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def _start(stack: Stack, fail_open: bool) -> None:
    bootstrap = stack.bootstrap()
    _ext_proc(bootstrap)["failure_mode_allow"] = fail_open
    _ext_proc(bootstrap)["message_timeout"] = "1s"  # shipped: 10s; a hung server is found faster
    stack.start_extproc()
    stack.start_envoy(bootstrap)


def _break(stack: Stack, how: str) -> None:
    if how == "killed":
        stack.stop_process("extproc", signal.SIGKILL)
    else:
        os.kill(stack.processes["extproc"].pid, signal.SIGSTOP)


def _resume(stack: Stack) -> None:
    process = stack.processes.get("extproc")
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_fail_open_never_forwards_a_gateway_key(keyed: Stack, fake: FakeProvider, how: str) -> None:
    _start(keyed, fail_open=True)
    try:
        assert _post_with_key(keyed).status_code == 200
        assert fake.received[-1].headers["x-api-key"] == PROVIDER_SECRET  # swapped
        _break(keyed, how)
        fake.clear()
        _post_with_key(keyed)
        _openai_with_key(keyed)
        sso = {**HEADERS, "authorization": f"Bearer {SSO_TOKEN}"}  # a sign-in token (a JWT)
        httpx.post(f"{keyed.url}/v1/messages", json=BODY, headers=sso, timeout=30)
    finally:
        _resume(keyed)
    assert len(fake.received) == 3  # failing open: forwarded, policies skipped ...
    for request in fake.received:  # ... but never with a gateway key or SSO token
        assert KEY not in str(request.headers)
        assert "gwk_" not in str(request.headers)
        assert "eyJ" not in str(request.headers)


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_fail_closed_answers_a_plain_503_in_the_callers_shape(
    keyed: Stack, fake: FakeProvider, how: str
) -> None:
    _start(keyed, fail_open=False)
    try:
        assert _post_with_key(keyed).status_code == 200
        _break(keyed, how)
        fake.clear()
        anthropic_reply, openai_reply = _post_with_key(keyed), _openai_with_key(keyed)
    finally:
        _resume(keyed)
    assert fake.received == []
    for reply in (anthropic_reply, openai_reply):
        assert reply.status_code == 503, reply.text
        assert reply.headers["x-gateway-error"] == "gateway_unavailable"
        assert "ext_proc" not in reply.text
        assert "gRPC" not in reply.text
    assert anthropic_reply.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": "the gateway is unavailable; retry shortly"},
    }
    assert openai_reply.json()["error"]["message"] == "the gateway is unavailable; retry shortly"
    assert openai_reply.json()["error"]["code"] == "gateway_unavailable"
