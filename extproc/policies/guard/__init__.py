"""Guardrails: secret/PII redaction, reversible masking, injection and output screening.

Pure and I/O-free. Build a `Guard` once from `GuardConfig` at start; per request:

    policy = guard.profile(route_profile_name)          # KeyError if unknown
    result = policy.redact_request(body, "anthropic")   # RedactResult
    if result.blocked: respond 400 naming result.blocked (a rule id, never the value)
    verdict = policy.screen_injection(body, "anthropic")  # InjectionVerdict
    if verdict.blocked: respond 400
    forward result.body (re-encoded) if result.changed else the original bytes

    # response, streamed: one screener (+ unmasker) per content block index
    stream = policy.output_stream()
    unmask = policy.unmasker(result.masks).stream(json_escape=is_input_json_delta)
    out = stream.feed(delta_text)        # ScreenedChunk: .text to send, .blocked
    send(unmask.feed(out.text)); at content_block_stop: stream.flush(), unmask.flush()
    if out.blocked: end the stream with an error event naming the rule
    # response, JSON: policy.screen_response(body, api), then
    # policy.unmasker(result.masks).response(body, api)
    # structured output: policy.check_structured(text);
    # act on a failure per policy.config.output.schema_action ("block" or "log")

Order: screen output first, then unmask, so restored PII is never "redacted back".
Streamed thinking and tool-call input are screened too (`extproc.apis.rewrite`); a
`signature_delta` passes untouched.
Verdicts, findings and results carry rule ids and counts only, never matched text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.apis.walk import WalkLimits, WalkMemo, model_texts

from .config import GuardConfig, GuardProfileConfig
from .detectors import BUILTIN_RULES, Detector, DetectorOptions, RegexRule, WordRule
from .injection import InjectionScreener, InjectionVerdict
from .output import (
    OutputResult,
    OutputRule,
    OutputScreener,
    SchemaVerdict,
    StreamScreener,
    phrase_rule,
    regex_rule,
    validate_structured,
)
from .redact import (
    Api,
    RedactPlan,
    RedactPolicy,
    RedactResult,
    Unmasker,
    plan_redaction,
    redact_request,
)

__all__ = [
    "Guard",
    "GuardConfig",
    "GuardProfileConfig",
    "InjectionVerdict",
    "Inspection",
    "OutputResult",
    "ProfileGuard",
    "RedactResult",
    "SchemaVerdict",
    "StreamScreener",
    "Unmasker",
]


@dataclass(frozen=True, slots=True)
class Inspection:
    """A request's screening, small enough to come back from a worker process."""

    redaction: RedactPlan
    injection: InjectionVerdict


@dataclass(frozen=True, slots=True)
class ProfileGuard:
    """One profile compiled into runtime objects; every method is pure."""

    name: str
    config: GuardProfileConfig
    redaction: RedactPolicy
    injection: InjectionScreener
    output: OutputScreener
    # Texts of the conversation's units walked before (each turn resends them all).
    walks: WalkMemo = field(default_factory=WalkMemo, compare=False)

    def redact_request(self, body: Mapping[str, Any], api: Api) -> RedactResult:
        return redact_request(body, api, self.redaction)

    def screen_injection(self, body: Mapping[str, Any], api: Api) -> InjectionVerdict:
        return self.injection.screen(body, api)

    def inspect(
        self, body: Mapping[str, Any], api: Api, limits: WalkLimits | None = None
    ) -> Inspection:
        """Redaction and injection scoring over one walk of the request's texts."""
        tools = self.redaction.scan_tool_definitions
        texts = model_texts(body, api, tools=tools, limits=limits, memo=self.walks)
        plan = plan_redaction(texts, self.redaction)
        return Inspection(plan, self.injection.screen_texts(texts, body))

    def forget(self) -> None:
        """Drop what earlier requests left in the caches (benchmarks of a cold scan)."""
        self.walks.clear()
        self.redaction.detector.cache.clear()
        self.injection.scores.clear()

    def unmasker(self, masks: Mapping[str, str]) -> Unmasker:
        return Unmasker(masks)

    def output_stream(self) -> StreamScreener:
        return self.output.stream()

    def screen_response(self, body: Mapping[str, Any], api: Api) -> OutputResult:
        return self.output.screen_response(body, api)

    def check_structured(self, text: str) -> SchemaVerdict | None:
        """An answer's text vs the profile's schema; None when there is no schema."""
        schema = self.config.output.json_schema
        return None if schema is None else validate_structured(text, schema)


def compile_profile(name: str, cfg: GuardProfileConfig, hash_key: bytes = b"") -> ProfileGuard:
    actions = {rid: cfg.action_for(rid, info.kind) for rid, info in BUILTIN_RULES.items()}
    actions |= {c.id: cfg.actions.get(c.id, c.action) for c in cfg.custom}
    enabled = [rid for rid, action in actions.items() if action != "off"]
    options = DetectorOptions(
        cfg.entropy_threshold,
        frozenset(cfg.allow_values),
        frozenset(d.lower() for d in cfg.allow_email_domains),
    )
    live = [c for c in cfg.custom if actions[c.id] != "off"]
    detector = Detector(
        enabled,
        words=[WordRule(c.id, c.words, c.case_sensitive) for c in live if c.words],
        regexes=[RegexRule(c.id, c.regex, c.case_sensitive) for c in live if c.regex],
        options=options,
    )
    labels = {rid: info.label for rid, info in BUILTIN_RULES.items()}
    labels |= {c.id: c.id.upper() for c in cfg.custom}
    mask_kinds = frozenset(cfg.masking.kinds) if cfg.masking.enabled else frozenset()
    redaction = RedactPolicy(
        detector, actions, labels, mask_kinds, hash_key, cfg.scan_tool_definitions
    )
    inj = cfg.injection
    screener = InjectionScreener(
        threshold=inj.threshold,
        action=inj.action,
        sources=inj.sources,
        scope=inj.scope,
        weights=inj.weights,
    )
    return ProfileGuard(name, cfg, redaction, screener, _output(cfg, hash_key))


def _output(cfg: GuardProfileConfig, hash_key: bytes) -> OutputScreener:
    out = cfg.output
    rules: list[OutputRule] = []
    for d in out.deny:
        if d.phrase is not None:
            rules.append(phrase_rule(d.id, d.phrase, d.action))
        elif d.regex is not None:
            rules.append(regex_rule(d.id, d.regex, d.max_len or out.hold_back, d.action))
    return OutputScreener(rules, strip_secrets=out.strip_secrets, hash_key=hash_key)


class Guard:
    """All profiles, compiled once at start."""

    def __init__(self, config: GuardConfig | None = None, *, hash_key: bytes | None = None) -> None:
        """`hash_key`: the resolved `config.hash_key` (env/file sources are the caller's I/O)."""
        self.config = config or GuardConfig()
        source = self.config.hash_key
        if hash_key is None and source is not None and source.value is not None:
            hash_key = source.value.get_secret_value().encode()
        key = hash_key or b""
        self._profiles = {n: compile_profile(n, p, key) for n, p in self.config.profiles.items()}

    def profile(self, name: str | None = None) -> ProfileGuard:
        return self._profiles[name or self.config.default_profile]
