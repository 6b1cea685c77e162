"""Turn a finished request into its audit record and metric updates.

Called exactly once per request by `RequestStream.close`. The record is built from
values: the request's own facts (`RequestStream.audit_values`) and the fields each
policy step returns (`extproc.policies.step.Step.audit_fields`). The record holds
who, what and how much, never credentials; prompt and completion text only when
the route's profile records text (`profiles.NAME.audit.record_text`, else the global
`audit.record_text`; never on a `zero_data_retention` profile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from extproc.policies.step import Done, Step

if TYPE_CHECKING:
    from extproc.stream import RequestStream


def build_record(
    facts: Mapping[str, Any], steps: Sequence[Step], done: Done, text: Mapping[str, Any]
) -> dict[str, Any]:
    """The audit record: the request's own facts, then each step's fields in the steps'
    fixed order (auth, model policy, guard, cache, spend), then the recorded text (if any)."""
    record = dict(facts)
    for step in steps:
        record.update(step.audit_fields(done))
    record.update(text)
    return record


def audit_record(stream: RequestStream, now: float) -> dict[str, Any]:
    facts, steps, done, text = stream.audit_values(now)
    return build_record(facts, steps, done, text)


def account(stream: RequestStream, now: float) -> None:
    record = audit_record(stream, now)
    stream.gw.audit.write(record)
    generates = stream.route is not None and stream.route.endpoint.generates
    stream.gw.otel.record(stream.trace, record, generates)
    metrics = stream.gw.metrics
    outcome = stream.outcome or ""
    rejected = outcome.startswith("rejected_")
    # A rejected request's model is whatever the caller wrote: never a label value.
    answered = outcome in ("ok", "cache_hit") and stream.answer.served_model is not None
    model = "" if rejected else metrics.bounds.model(record["served_model"], answered=answered)
    provider = record["provider"] or ""
    metrics.child(
        metrics.requests,
        stream.api,
        record["endpoint"] or "",
        model,
        provider,
        str(record["status"]),
        outcome,
    ).inc()
    requested = metrics.bounds.model(record["requested_model"])
    if requested and stream.served_model and not rejected:
        served = metrics.bounds.model(stream.served_model)
        metrics.child(metrics.model_mapping, requested, served, provider).inc()
    if not generates:
        return
    if stream.agent_id is not None:  # a subagent's call; ids stay out of labels
        metrics.child(metrics.subagent_requests, record["endpoint"]).inc()
    if "cache" in record:  # the cache step ran: hit, miss, bypass or wait_timeout
        metrics.child(metrics.cache, record["cache"]).inc()
    metrics.count_tokens(model, provider, stream.answer.usage, saved=stream.outcome == "cache_hit")
    if stream.outcome == "cache_hit":
        if record.get("cost_saved_usd"):
            metrics.child(metrics.cache_saved_usd, model).inc(record["cost_saved_usd"])
    elif record.get("scopes") and not rejected:
        metrics.count_scopes(record["scopes"], stream.answer.usage, record.get("cost_usd"))
    latency = metrics.child(
        metrics.latency, stream.api, record["endpoint"], str(stream.answer.streamed)
    )
    latency.observe(now - stream.started)
    if stream.answer.first_token_at is not None:
        metrics.child(metrics.ttft, model).observe(stream.answer.first_token_at - stream.started)
