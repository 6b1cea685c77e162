"""Guardrails on the request path: screen the prompt going out, the answer coming back.

One `GuardRun` per request, on routes whose profile has a guard profile (the
`guard:` config section is present). Going out: secrets and PII are redacted,
masked (reversibly) or block the request (400 naming the rule, never the
value), and untrusted content is scored for prompt injection, both over one walk
of every model-visible text (`extproc.apis.walk`). Coming back: a JSON answer
(or a cached one, on replay) is screened whole; a streamed answer is screened
delta by delta (text, thinking, tool-call input) through `SseTextRewriter`,
with a bounded hold-back so a secret split across chunks is still caught;
masked values are restored after screening, so the provider never sees them
and restored values are never "redacted back".
Verdicts (rule, action, count) go to the audit record and metrics, never the
matched text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.apis import ApiKind, Endpoint, dialect_of
from extproc.apis.dialect import Accumulator
from extproc.apis.rewrite import SseTextRewriter, StopAnswer
from extproc.apis.walk import WalkLimits
from extproc.errors import AnswerWithheld, BadRequest
from extproc.policies.guard import Inspection, ProfileGuard, StreamScreener
from extproc.policies.guard.redact import RedactResult, StreamUnmasker, apply_plan
from extproc.policies.step import Exchange, Run
from extproc.telemetry.metrics import Metrics


class GuardedText:
    """Screen, then unmask, one content block's streamed text."""

    def __init__(self, screener: StreamScreener, unmask: StreamUnmasker | None) -> None:
        self.screener = screener
        self.unmask = unmask

    def feed(self, text: str) -> str:
        return self._pass(self.screener.feed(text))

    def flush(self) -> str:
        out = self._pass(self.screener.flush())
        return out + (self.unmask.flush() if self.unmask is not None else "")

    def _pass(self, chunk: Any) -> str:
        if chunk.blocked:
            raise StopAnswer(
                f"the answer was stopped by the gateway's output policy ({chunk.blocked})",
                chunk.blocked,
            )
        return self.unmask.feed(chunk.text) if self.unmask is not None else str(chunk.text)


class GuardStep:
    """The guard's place in the step order: on for a route whose profile has a guard
    profile, on every endpoint but the model list."""

    def open(self, exchange: Exchange) -> GuardRun | None:
        route = exchange.route
        policy = exchange.gw.guard_for(exchange.profile.guard)
        if policy is None or route is None or route.endpoint is Endpoint.MODELS:
            return None
        limits = WalkLimits(exchange.gw.config.limits.max_scan_chars)
        return GuardRun(policy, exchange.dialect.name, exchange.gw.metrics, limits=limits)


GUARD = GuardStep()


@dataclass
class GuardRun(Run):
    policy: ProfileGuard
    api: ApiKind
    metrics: Metrics
    masks: Mapping[str, str] = field(default_factory=dict)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    injection: dict[str, Any] | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    screeners: list[StreamScreener] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    limits: WalkLimits | None = None
    stream: SseTextRewriter | None = None  # the streamed answer's rewriter, once made

    # -- the step's hooks ----------------------------------------------------------

    def start(self, exchange: Exchange) -> None:
        """Screen the prompt before it leaves (a worker's inspection, if made, was made
        without the parts the dialect holds out too); rewrite the body if it changed."""
        assert exchange.request is not None
        dialect = exchange.dialect
        body, held = dialect.held_out(exchange.request.body)
        worker = exchange.request.worker  # a heavy body: the worker applied the redaction
        replaced = self.inspect_request(body, exchange.inspection, applied=worker is not None)
        if replaced is None:
            if worker is not None and worker.changed:  # forward it as the worker redacted it
                exchange.replace_body(exchange.request.body)
            return
        if held is not None:  # forwarded as it came, whatever the guard did
            dialect.put_back(replaced, held)
        exchange.replace_body(replaced)

    def answer(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A complete JSON answer (fresh, or replayed from the cache: it may have been
        stored by a route with another guard profile, or none) screened whole."""
        replaced, blocked = self.screen_answer(body)
        if blocked is not None:
            message = f"the answer was withheld by the gateway's output policy ({blocked})"
            raise AnswerWithheld(message)
        return replaced

    def stream_end(self, accumulator: Accumulator | None) -> None:
        """A streamed answer has left by now: its verdicts and a schema failure can only
        be recorded."""
        if self.stream is not None:
            self.finish_stream(self.stream)
        if accumulator is not None and accumulator.complete:
            self.check_schema(accumulator.folded_message())

    def audit_fields(self, done: object = None) -> dict[str, Any]:
        """The guard step's part of the audit record (verdicts, never matched text)."""
        return {"guard": self.audit()}

    # -- the screening -------------------------------------------------------------

    def _verdict(self, direction: str, rule: str, action: str, count: int) -> None:
        entry = {"rule": rule, "action": action, "count": count}
        (self.verdicts if direction == "input" else self.output).append(entry)
        self.metrics.guard.labels(direction, rule, action).inc(count)

    def inspect_request(
        self, body: dict[str, Any], inspection: Inspection | None = None, *, applied: bool = False
    ) -> dict[str, Any] | None:
        """The body to send instead (None: unchanged); `BadRequest` when a rule blocks.
        `inspection`: the screening already done elsewhere (a worker process); `applied`:
        its redaction is already in `body` too (the worker applied it)."""
        if inspection is None:
            inspection = self.policy.inspect(body, self.api, self.limits)
        plan = inspection.redaction
        if applied:
            result = RedactResult(None, plan.verdicts, plan.blocked, plan.masks)
        else:
            result = apply_plan(body, plan)
        for verdict in result.verdicts:
            self._verdict("input", verdict.rule, verdict.action, verdict.count)
        if result.blocked is not None:
            raise BadRequest(
                f"the request contains content the gateway does not let leave ({result.blocked}); "
                "remove it and retry",
                reason="guard_blocked",
            )
        self.masks = result.masks
        screened = inspection.injection
        if screened.rules:
            self.injection = {
                "score": round(screened.score, 3),
                "rules": list(screened.rules),
                "source": screened.source,
                "action": screened.action,
            }
            self.metrics.guard.labels("injection", screened.rules[0], screened.action).inc()
        if screened.blocked:
            raise BadRequest(
                f"the request looks like a prompt-injection attempt ({', '.join(screened.rules)}) "
                f"in {screened.source} content",
                reason="prompt_injection",
            )
        return result.body

    def _block_text(self) -> GuardedText:
        screener = self.policy.output_stream()
        self.screeners.append(screener)
        unmask = self.policy.unmasker(self.masks).stream() if self.masks else None
        return GuardedText(screener, unmask)

    def rewriter(self) -> SseTextRewriter:
        """The streamed answer's texts screened (and unmasked) as they pass."""
        self.stream = dialect_of(self.api).rewriter(self._block_text)
        return self.stream

    def finish_stream(self, rewriter: SseTextRewriter) -> None:
        counts: dict[tuple[str, str], int] = {}
        for screener in self.screeners:
            for finding in screener.findings:
                key = (finding.rule, finding.action)
                counts[key] = counts.get(key, 0) + finding.count
        for (rule, action), count in counts.items():
            self._verdict("output", rule, action, count)
        if rewriter.stopped is not None and not counts:
            self._verdict("output", rewriter.stopped.rule, "block", 1)

    def check_schema(self, answer: Mapping[str, Any]) -> bool:
        """Check a structured answer against the profile's JSON schema (if it has one);
        True when it fails and `schema_action` is block."""
        if self.policy.config.output.json_schema is None:
            return False  # no schema: the answer's text is not needed
        verdict = self.policy.check_structured(answer_text(answer, self.api))
        if verdict is None:
            return False
        self.schema = {"ok": verdict.ok, "errors": list(verdict.errors[:5])}
        if verdict.ok:
            return False
        action = self.policy.config.output.schema_action
        self._verdict("output", "json_schema", action, 1)
        return action == "block"

    def screen_answer(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """(the answer to send instead, or None if unchanged; the rule that withheld it)."""
        result = self.policy.screen_response(body, self.api)
        for finding in result.findings:
            self._verdict("output", finding.rule, finding.action, finding.count)
        if result.blocked is not None:
            return None, result.blocked
        if self.check_schema(result.body or body):
            return None, "json_schema"
        screened = result.body if result.body is not None else body
        unmasked = (
            self.policy.unmasker(self.masks).response(screened, self.api) if self.masks else None
        )
        final = unmasked if unmasked is not None else result.body
        return final, None

    def audit(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "profile": self.policy.name,
            "input": self.verdicts,
            "output": self.output,
        }
        if self.injection is not None:
            record["injection"] = self.injection
        if self.masks:
            record["masked"] = len(self.masks)
        if self.schema is not None:
            record["schema"] = self.schema
        return record


def answer_text(answer: Mapping[str, Any], api: ApiKind) -> str:
    """The text of an answer (its dialect's `answer_text`)."""
    return dialect_of(api).answer_text(answer)
