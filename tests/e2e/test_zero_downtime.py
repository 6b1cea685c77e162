"""Zero downtime with two ext_proc replicas behind one real Envoy.

Two `extproc serve` processes sit in Envoy's `extproc` cluster. Streaming requests (each
about 3 s of SSE from the fake provider) arrive every 50 ms; partway through, one
replica is stopped:

* SIGTERM (`--drain`, `--grace`): the replica turns NOT_SERVING, Envoy's active gRPC health
  check takes it out, new streams go to the other replica, the port closes after `drain`
  and the streams still open on it finish within `grace`. No request may fail.
* SIGKILL: the streams open on the killed replica are cut (their response headers are
  already sent, so the client sees a truncated body), and requests routed to it before
  Envoy notices (or still waiting there for response headers) fail with 503. Both are
  bounded: nothing started after the detection window fails, and /clusters shows the
  replica failed_active_hc. With outlier detection on local-origin errors (the change
  docs/mesh.md recommends for envoy/front-proxy.yaml) the 503s of new requests disappear;
  with failure_mode_allow the cut streams go on unprocessed instead.

The bootstrap is the one `extproc up` renders, with the second endpoint added and the
health check sped up (0.4 s instead of 5 s) so the test is quick. It also sets
`no_traffic_interval`: without it Envoy checks a cluster that has carried no traffic yet
only every 60 s, so a replica stopped in Envoy's first minute is never seen NOT_SERVING
and every request sent to it after its port closes fails (measured: 79 of 275).
"""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc import supervisor
from extproc.config import Config, parse_config
from tests.fake_provider import FakeProvider
from tests.harness import Stack, free_port, gateway_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HC_INTERVAL_S = 0.4
# A generous timeout: on a loaded 2-core machine a slow answer from the healthy replica
# must not count as a failure (two in a row would take it out too).
HC_TIMEOUT_S = 1.0
HC_UNHEALTHY_THRESHOLD = 2
# Worst case from the NOT_SERVING flip to Envoy acting on it: one interval until the next
# check, threshold-1 more intervals, plus the check timeout.
DETECTION_S = HC_INTERVAL_S * HC_UNHEALTHY_THRESHOLD + HC_TIMEOUT_S
DRAIN_S = 2.0  # must exceed DETECTION_S, and be shorter than a stream
GRACE_S = 10.0
EVENT_GAP_MS = 300  # the fake sends 11 events: a stream lasts 10 gaps, 3 s
LOAD_S = 6.0
SIGNAL_AT_S = 2.0
SPAWN_EVERY_S = 0.05
SLACK_S = 1.0

BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}


@dataclass
class Outcome:
    request_id: str
    started: float  # monotonic, relative to the start of the load
    ended: float = 0.0
    status: int = 0
    complete: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete

    @property
    def cut_mid_stream(self) -> bool:
        return self.status == 200 and not self.complete


class TwoReplicas(Stack):
    """The harness stack with two ext_proc processes ("a", "b") in one Envoy cluster."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        data_b = dict(self.data)
        data_b["grpc_listen"] = f"127.0.0.1:{free_port()}"
        data_b["metrics_listen"] = f"127.0.0.1:{free_port()}"
        data_b["audit"] = {"sink": str(self.workdir / "audit-b.jsonl")}
        self.config_b: Config = parse_config(data_b)
        self.config_path_b = self.workdir / "gateway-b.yaml"
        self.config_path_b.write_text(yaml.safe_dump(data_b), encoding="utf-8")

    def start_replicas(self, drain: float, grace: float) -> None:
        flags = ["--drain", str(drain), "--grace", str(grace)]
        serve = [sys.executable, "-m", "extproc", "--log-level", "warning", "serve", *flags]
        self._spawn("a", [*serve, "--config", str(self.config_path)])
        self._spawn("b", [*serve, "--config", str(self.config_path_b)])
        for name, config in (("a", self.config), ("b", self.config_b)):
            if not supervisor.wait_grpc_serving(config.grpc_listen, timeout=30):
                raise RuntimeError(f"replica {name} did not start:\n{self.log_text(name)}")

    def audit_ids(self, path: Path) -> set[str]:
        if not path.exists():
            return set()
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return {str(record["request_id"]) for record in records}

    def close(self) -> None:
        # A graceful stop would wait out --drain for nothing; the scenarios are over.
        for name in ("a", "b"):
            self.stop_process(name, signal.SIGKILL)
        super().close()

    def health_flags(self) -> dict[int, str]:
        """Envoy's view of each ext_proc endpoint, by port (admin /clusters)."""
        url = f"http://{self.config.envoy.admin}/clusters"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
        flags = {}
        for line in text.splitlines():
            parts = line.split("::")
            if parts[0] == "extproc" and len(parts) == 4 and parts[2] == "health_flags":
                flags[int(parts[1].rsplit(":", 1)[1])] = parts[3]
        return flags


def two_endpoint_bootstrap(
    stack: TwoReplicas, *, outlier_detection: bool = False, fail_open: bool = False
) -> dict[str, Any]:
    bootstrap = stack.bootstrap()
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc")
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    second = copy.deepcopy(endpoints[0])
    second["endpoint"]["address"]["socket_address"]["port_value"] = stack.config_b.grpc_listen.port
    endpoints.append(second)
    check = cluster["health_checks"][0]
    check["interval"] = f"{HC_INTERVAL_S}s"
    check["timeout"] = f"{HC_TIMEOUT_S}s"
    check["no_traffic_interval"] = f"{HC_INTERVAL_S}s"
    check["unhealthy_threshold"] = HC_UNHEALTHY_THRESHOLD
    if outlier_detection:
        cluster["outlier_detection"] = {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        }
    if fail_open:
        listener = bootstrap["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for http_filter in hcm["http_filters"]:
            if http_filter["name"] == "envoy.filters.http.ext_proc":
                http_filter["typed_config"]["failure_mode_allow"] = True
    return bootstrap


@pytest.fixture
def replicas(fake: FakeProvider) -> Iterator[TwoReplicas]:
    stack = TwoReplicas(gateway_config(fake.url))
    stack.start_replicas(DRAIN_S, GRACE_S)
    try:
        yield stack
    finally:
        stack.close()


async def _stream(client: httpx.AsyncClient, outcome: Outcome, origin: float) -> None:
    headers = {
        "anthropic-version": "2023-06-01",
        "x-api-key": "client-key",
        "x-fake-delay-ms": str(EVENT_GAP_MS),
    }
    try:
        async with client.stream("POST", "/v1/messages", json=BODY, headers=headers) as reply:
            outcome.status = reply.status_code
            # The edge Envoy generates x-request-id; the gateway returns it (= the audit id).
            outcome.request_id = reply.headers.get("x-gateway-request-id", outcome.request_id)
            body = b"".join([chunk async for chunk in reply.aiter_bytes()])
            outcome.complete = b"event: message_stop" in body
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)
    outcome.ended = time.monotonic() - origin


@dataclass
class Run:
    outcomes: list[Outcome]
    signalled_at: float
    unhealthy_at: float | None  # when /clusters first showed replica a failed


async def _load_and_signal(stack: TwoReplicas, sig: int) -> Run:
    """Stream requests for LOAD_S seconds; send `sig` to replica a at SIGNAL_AT_S."""
    origin = time.monotonic()
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    port_a = stack.config.grpc_listen.port
    signalled_at, unhealthy_at = 0.0, None
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits) as client:
        while (now := time.monotonic() - origin) < LOAD_S:
            if not signalled_at and now >= SIGNAL_AT_S:
                stack.processes["a"].send_signal(sig)
                signalled_at = now
            if signalled_at and unhealthy_at is None:
                flags = await asyncio.to_thread(stack.health_flags)
                if "failed_active_hc" in flags.get(port_a, ""):
                    unhealthy_at = time.monotonic() - origin
            outcome = Outcome(f"zd-{len(outcomes)}", now)
            outcomes.append(outcome)
            tasks.append(asyncio.create_task(_stream(client, outcome, origin)))
            await asyncio.sleep(SPAWN_EVERY_S)
        await asyncio.gather(*tasks)
    return Run(outcomes, signalled_at, unhealthy_at)


def _summary(name: str, run: Run) -> str:
    failed = [o for o in run.outcomes if not o.ok]
    cut = sum(o.cut_mid_stream for o in failed)
    refused = sum(o.status == 503 for o in failed)
    detect = None if run.unhealthy_at is None else round(run.unhealthy_at - run.signalled_at, 2)
    return (
        f"{name}: {len(run.outcomes)} streams, {len(failed)} failed "
        f"({cut} cut mid-stream, {refused} answered 503, "
        f"{len(failed) - cut - refused} other); replica marked unhealthy {detect} s after signal"
    )


def _audit_ids_once_written(replicas: TwoReplicas, path: Path, expected: int) -> set[str]:
    """Audit ids at `path`, waiting a moment for `expected` of them: a record is written
    as its ext_proc stream closes, just after the reply."""
    deadline = time.monotonic() + 5
    ids = replicas.audit_ids(path)
    while len(ids) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        ids = replicas.audit_ids(path)
    return ids


async def test_sigterm_under_streaming_load_fails_nothing(replicas: TwoReplicas) -> None:
    replicas.start_envoy(two_endpoint_bootstrap(replicas))
    run = await _load_and_signal(replicas, signal.SIGTERM)
    print(_summary("SIGTERM", run))

    failed = [o for o in run.outcomes if not o.ok]
    assert failed == [], failed[:5]
    assert replicas.processes["a"].wait(timeout=GRACE_S) == 0
    assert run.unhealthy_at is not None
    assert run.unhealthy_at - run.signalled_at < DRAIN_S, "health check slower than --drain"

    served_by_a = replicas.audit_ids(replicas.audit_path)
    by_id = {o.request_id: o for o in run.outcomes}
    on_a = [by_id[i] for i in served_by_a]
    # Streams on the stopped replica that outlived its listening socket: they finished
    # during --grace, after the port closed.
    closed_at = run.signalled_at + DRAIN_S
    assert any(o.started < closed_at < o.ended for o in on_a), "no stream spanned the close"
    # Once Envoy saw it NOT_SERVING, no new stream went to it.
    assert all(o.started <= run.unhealthy_at + SPAWN_EVERY_S for o in on_a)
    served_by_b = _audit_ids_once_written(
        replicas, replicas.workdir / "audit-b.jsonl", len(run.outcomes) - len(served_by_a)
    )
    assert len(served_by_a) + len(served_by_b) == len(run.outcomes)


@pytest.mark.parametrize(
    ("outlier_detection", "fail_open"),
    [(False, False), (True, False), (False, True)],
    ids=["front-proxy", "outlier-detection", "fail-open"],
)
async def test_sigkill_failures_are_bounded(
    replicas: TwoReplicas, outlier_detection: bool, fail_open: bool
) -> None:
    bootstrap = two_endpoint_bootstrap(
        replicas, outlier_detection=outlier_detection, fail_open=fail_open
    )
    replicas.start_envoy(bootstrap)
    run = await _load_and_signal(replicas, signal.SIGKILL)
    variant = "outlier detection" if outlier_detection else "fail open" if fail_open else "as is"
    print(_summary(f"SIGKILL ({variant})", run))

    assert run.unhealthy_at is not None, "Envoy's health check never took the replica out"
    assert run.unhealthy_at - run.signalled_at <= DETECTION_S + SLACK_S
    assert replicas.health_flags()[replicas.config_b.grpc_listen.port] == "healthy"
    failed = [o for o in run.outcomes if not o.ok]
    assert all(o.status in (200, 503) for o in failed), failed[:5]
    # What fails: streams already open on the killed replica (cut mid-body) ...
    cut = [o for o in failed if o.cut_mid_stream]
    assert all(o.started < run.signalled_at for o in cut)
    # ... and requests answered 503: those Envoy sent to it before ejecting it (connect
    # refused), plus any still waiting for response headers on it when it died.
    refused = [o for o in failed if o.status == 503]
    window = (run.signalled_at - SLACK_S, run.unhealthy_at + SLACK_S)
    assert all(window[0] <= o.started <= window[1] for o in refused), (run, refused)
    if outlier_detection:  # the first connect failure ejects the host
        assert sum(o.started >= run.signalled_at for o in refused) <= 1
    if fail_open:
        assert failed == []  # streams continue unprocessed: no policy, no audit record
    else:
        assert cut, "expected the killed replica's open streams to be cut"
