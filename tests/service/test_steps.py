"""Policy steps run from one ordered list through the same hooks (issue 10 item 5): a new
policy is one `Policy` and one entry in `STEPS`, with no change to `RequestStream`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import pytest

from extproc import stream as stream_module
from extproc.decisions import Continue, Respond
from extproc.errors import Forbidden
from extproc.policies.auth import AUTH, AuthRun
from extproc.policies.guard.run import GUARD
from extproc.policies.models import MODELS, ModelRun
from extproc.policies.step import Done, Ending, Exchange, Reply, Run
from extproc.policies.steps import STEPS, at_headers
from extproc.store.memory import MemoryStore
from tests.service.test_guard_and_bounds import ANSWER, HEADERS, ListSink, ask, call, gateway

PLAIN = {**ANSWER, "content": [{"type": "text", "text": "hello"}]}


@dataclass
class ProbeRun(Run):
    """Records every hook it is given, in order."""

    waits: ClassVar[bool] = True
    closes: ClassVar[bool] = True
    calls: list[str] = field(default_factory=list)
    reply: dict[str, Any] | None = None

    def start(self, exchange: Exchange) -> None:
        assert exchange.request is not None
        self.calls.append("start")
        exchange.replace_body({**exchange.request.body, "metadata": {"user_id": "probe"}})

    async def request(self, exchange: Exchange, reply: Reply | None) -> Reply | None:
        self.calls.append("request")
        if self.reply is not None:
            return Reply(self.reply, "probe_reply", (("x-probe", "reply"),), "probe")
        return reply

    def answer_headers(self) -> tuple[tuple[str, str], ...]:
        self.calls.append("answer_headers")
        return (("x-probe", "miss"),)

    def answer(self, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("answer")
        return {**body, "probed": True}

    async def close(self, ending: Ending) -> None:
        self.calls.append(f"close:{ending.outcome}")

    def audit_fields(self, done: Done) -> dict[str, Any]:
        return {"probe": list(self.calls)}


@dataclass
class Probe:
    on: bool = True
    reply: dict[str, Any] | None = None
    runs: list[ProbeRun] = field(default_factory=list)

    def open(self, exchange: Exchange) -> Run | None:
        if not self.on:
            return None
        run = ProbeRun(reply=self.reply)
        self.runs.append(run)
        return run


def with_step(monkeypatch: pytest.MonkeyPatch, probe: Probe) -> None:
    monkeypatch.setattr(stream_module, "STEPS", (*STEPS, probe))


def records(gw: Any) -> list[dict[str, Any]]:
    sink = gw.audit
    assert isinstance(sink, ListSink)
    return sink.records


async def test_a_new_step_runs_every_hook_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = Probe()
    with_step(monkeypatch, probe)
    gw = gateway(MemoryStore(), guard=True)
    decision, got = await call(gw, ask(), orjson.dumps(PLAIN))
    assert isinstance(decision, Continue)
    assert decision.body is not None  # the step rewrote the body the provider gets
    assert orjson.loads(decision.body)["metadata"] == {"user_id": "probe"}
    assert orjson.loads(got)["probed"] is True  # its answer hook changed the answer
    (run,) = probe.runs
    assert run.calls == ["start", "request", "answer_headers", "answer", "close:ok"]
    (record,) = records(gw)
    assert record["probe"] == run.calls  # the record is made after every step closed
    assert {"guard", "cache", "scopes", "probe"} <= record.keys()


async def test_a_steps_reply_is_screened_and_sent_as_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = Probe(reply=PLAIN)
    with_step(monkeypatch, probe)
    gw = gateway(MemoryStore(), guard=False)
    for streamed in (False, True):
        decision, _ = await call(gw, ask(streamed))
        assert isinstance(decision, Respond)
        assert decision.status == 200
        assert dict(decision.headers)["x-probe"] == "reply"
        assert b"probed" in decision.body  # the answer hooks saw the reply
    assert [r["outcome"] for r in records(gw)] == ["probe_reply", "probe_reply"]


async def test_a_step_that_is_off_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = Probe(on=False)
    with_step(monkeypatch, probe)
    gw = gateway(MemoryStore(), guard=False)
    decision, _ = await call(gw, ask(), orjson.dumps(PLAIN))
    assert isinstance(decision, Continue)
    assert probe.runs == []
    (record,) = records(gw)
    assert "probe" not in record


async def test_a_refusal_in_a_step_is_audited_with_the_steps_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Refuses(Run):
        def start(self, exchange: Exchange) -> None:
            raise Forbidden("not on this route", reason="probe_refused")

    class Refusing:
        def open(self, exchange: Exchange) -> Run | None:
            return Refuses()

    after_guard = STEPS.index(GUARD) + 1  # auth and model policy come first
    monkeypatch.setattr(
        stream_module, "STEPS", (*STEPS[:after_guard], Refusing(), *STEPS[after_guard:])
    )
    gw = gateway(MemoryStore(), guard=True)
    decision, _ = await call(gw, ask())
    assert isinstance(decision, Respond)
    assert decision.status == 403
    (record,) = records(gw)
    assert record["outcome"] == "rejected_probe_refused"
    assert "guard" in record  # the guard ran before it
    assert "cache" not in record  # the later steps never opened
    assert "scopes" not in record


def test_auth_and_model_policy_are_the_first_steps_of_the_one_order() -> None:
    assert STEPS[:2] == (AUTH, MODELS)
    assert all(at_headers(policy) for policy in STEPS[:2])  # they open at the headers
    assert not any(at_headers(policy) for policy in STEPS[2:])


async def test_auth_and_model_policy_fields_come_from_their_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(AuthRun, "audit_fields", lambda self, done: {"caller": "from-auth"})
    monkeypatch.setattr(ModelRun, "audit_fields", lambda self, done: {"requested_model": "m"})
    gw = gateway(MemoryStore(), guard=False)
    decision, _ = await call(gw, ask(), orjson.dumps(PLAIN))
    assert isinstance(decision, Continue)
    (record,) = records(gw)
    assert (record["caller"], record["requested_model"]) == ("from-auth", "m")


async def test_a_refusal_at_the_headers_is_audited_with_the_auth_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def refuse(self: ModelRun, exchange: Exchange) -> None:
        raise Forbidden("no lists for this caller", reason="probe_refused")

    monkeypatch.setattr(ModelRun, "headers", refuse)
    gw = gateway(MemoryStore(), guard=True)
    stream = stream_module.RequestStream(gw)
    decision = await stream.request_headers(dict(HEADERS), False)
    assert isinstance(decision, Respond)
    assert decision.status == 403
    await stream.close()
    (record,) = records(gw)
    assert record["outcome"] == "rejected_probe_refused"
    assert record["identity"] == "anonymous"  # auth ran first and its fields are there
    assert "guard" not in record  # the body steps never opened
