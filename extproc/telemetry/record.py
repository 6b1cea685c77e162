"""Turn a finished request into its audit record and metric updates.

Called exactly once per request by `RequestStream._finish`. The record holds
who, what and how much, never credentials; prompt and completion text only when
the route's profile records text (`profiles.NAME.audit.record_text`, else the global
`audit.record_text`; never on a `zero_data_retention` profile).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from extproc.policies.pricing import cost_micros

if TYPE_CHECKING:
    from extproc.stream import RequestStream


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def audit_record(stream: RequestStream, now: float) -> dict[str, Any]:
    answer = stream.answer
    request = stream.request
    usage = answer.usage
    identity = stream.identity
    started_wall = stream.gw.wall_clock() - (now - stream.started)
    record: dict[str, Any] = {
        "time": dt.datetime.fromtimestamp(started_wall, dt.UTC).isoformat(timespec="milliseconds"),
        "request_id": stream.request_id,
        "route": stream.route_name,
        "api": stream.api,
        "endpoint": stream.route.endpoint.value if stream.route else None,
        "path": stream.path.split("?", 1)[0],
        "caller": identity.caller,
        "identity": identity.source,
        "key_id": identity.key_id,
        "user": identity.user,
        "team": identity.team,
        "project": identity.project,
        "tier": identity.tier,
        "session_id": stream.session_id,
        "agent_id": stream.agent_id,
        "parent_agent_id": stream.parent_agent_id,
        "provider": stream.target.name if stream.target else None,
        "requested_model": request.model if request else None,
        "served_model": answer.served_model or stream.served_model,
        "status": answer.status,
        "streamed": answer.streamed,
        "outcome": stream.outcome,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_1h_input_tokens": usage.cache_creation_1h_input_tokens,
        "web_search_requests": usage.web_search_requests,
        "latency_ms": _ms(now - stream.started),
        "ttft_ms": _ms(answer.first_token_at - stream.started) if answer.first_token_at else None,
        "finish_reasons": _finish_reasons(stream),
    }
    if answer.error_type:
        record["error_type"] = answer.error_type
    if stream.attempts:  # every provider Envoy tried, in order (extproc.fallback)
        record["attempts"] = [a.as_record() for a in stream.attempts]
    if "sso_group" in identity.labels:  # the sso.groups policy a signed-in user got
        record["sso_group"] = identity.labels["sso_group"]
    if answer.usage_estimated:
        record["usage_estimated"] = True
    spend = stream.spend
    if spend is not None:
        record["scopes"] = {scope.kind: scope.id for scope in spend.scopes}
        record["cost_usd"] = float(spend.cost_usd) if spend.cost_usd is not None else None
        if stream.outcome == "cache_hit" and spend.price is not None:
            saved = cost_micros(usage, spend.price) / 1e6
            record["cost_saved_usd"] = saved
    if stream.guard is not None:
        record["guard"] = stream.guard.audit()
    run = stream.cache_run
    if run is not None:
        record["cache"] = run.result
        record["cache_key"] = run.key
        record["cache_scope"] = run.scope
        record["cache_stored"] = stream.cache_stored
        if run.volatile:
            record["cache_volatile_paths"] = run.volatile
        if run.volatile_directories:
            record["cache_volatile_directories"] = run.volatile_directories
        if run.replaced:
            record["cache_replaced"] = True
    if request is not None and stream.profile.records_text(stream.gw.config.audit.record_text):
        record["prompt"] = {k: request.body[k] for k in ("system", "messages") if k in request.body}
        record["completion"] = _completion(stream)
    return record


def _completion(stream: RequestStream) -> Any:
    """The answer's content: the JSON body's, or the folded stream's when it completed."""
    if stream.answer.completion is not None:
        return stream.answer.completion
    accumulator = stream.accumulator
    if accumulator is None or not accumulator.complete:
        return None
    message = accumulator.folded_message()
    return message.get("content", message.get("choices"))


def _finish_reasons(stream: RequestStream) -> list[str]:
    """Why the model stopped: from the folded stream, or the JSON answer."""
    if stream.accumulator is not None:
        return stream.accumulator.finish_reasons()
    return stream.answer.finish_reasons


def account(stream: RequestStream, now: float) -> None:
    record = audit_record(stream, now)
    stream.gw.audit.write(record)
    generates = stream.route is not None and stream.route.endpoint.generates
    stream.gw.otel.record(stream.trace, record, generates)
    run = stream.cache_run
    metrics = stream.gw.metrics
    outcome = stream.outcome or ""
    rejected = outcome.startswith("rejected_")
    # A rejected request's model is whatever the caller wrote: never a label value.
    answered = outcome in ("ok", "cache_hit") and stream.answer.served_model is not None
    model = "" if rejected else metrics.bounds.model(record["served_model"], answered=answered)
    provider = record["provider"] or ""
    metrics.requests.labels(
        stream.api, record["endpoint"] or "", model, provider, str(record["status"]), outcome
    ).inc()
    requested = metrics.bounds.model(record["requested_model"])
    if requested and stream.served_model and not rejected:
        served = metrics.bounds.model(stream.served_model)
        metrics.model_mapping.labels(requested, served, provider).inc()
    if stream.route is None or not stream.route.endpoint.generates:
        return
    if stream.agent_id is not None:  # a subagent's call; ids stay out of labels
        metrics.subagent_requests.labels(record["endpoint"]).inc()
    if run is not None:
        metrics.cache.labels(run.result).inc()
    metrics.count_tokens(model, provider, stream.answer.usage, saved=stream.outcome == "cache_hit")
    if stream.outcome == "cache_hit":
        if record.get("cost_saved_usd"):
            metrics.cache_saved_usd.labels(model).inc(record["cost_saved_usd"])
    elif record.get("scopes") and not rejected:
        metrics.count_scopes(record["scopes"], stream.answer.usage, record.get("cost_usd"))
    metrics.latency.labels(stream.api, record["endpoint"], str(stream.answer.streamed)).observe(
        now - stream.started
    )
    if stream.answer.first_token_at is not None:
        metrics.ttft.labels(model).observe(stream.answer.first_token_at - stream.started)
