"""Guard configuration: frozen pydantic models, validated once at start.

YAML shape (under the gateway config's `guard:` key)::

    guard:
      hash_key: {env: GUARD_HASH_KEY}     # optional; env, file or value; keys the 4-hex hash
      default_profile: default
      profiles:
        default:
          actions: {secret: redact, pii: redact, ipv4: log, ipv6: log}
          allow_values: ["support@mycorp.com"]
          allow_email_domains: ["mycorp.test"]
          entropy_threshold: 3.0
          scan_tool_definitions: true
          custom:
            - {id: project_codename, words: ["Project Falcon", "falcon-x"], action: redact}
            - {id: internal_host, regex: '\\b[a-z0-9-]+\\.corp\\.internal\\b', action: log}
          masking: {enabled: false, kinds: [pii]}
          injection: {action: log, threshold: 0.8, sources: [tool_result, document, user],
                      scope: last_turn}
          output:
            strip_secrets: true
            hold_back: 128
            deny:
              - {id: no_rm_rf, phrase: "rm -rf /", action: block}
              - {id: ticket, regex: 'JIRA-[0-9]{1,6}', max_len: 16, action: redact}
            schema: null                # a JSON schema (subset, see output.py) or null
            schema_action: log

`actions` keys are rule ids (see `detectors.BUILTIN_RULES`) or a kind (`secret`,
`pii`, `custom`); a rule id wins over its kind. Unlisted rules use the defaults below.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from extproc.credentials import CredentialSource

from .detectors import BUILTIN_RULES, Kind
from .schema import check_schema_supported

__all__ = [
    "DEFAULT_ACTIONS",
    "Action",
    "CustomRuleConfig",
    "DenyPatternConfig",
    "GuardConfig",
    "GuardProfileConfig",
    "InjectionConfig",
    "MaskingConfig",
    "OutputConfig",
]


def _yaml_off(value: object) -> object:
    """YAML 1.1 reads a bare `off` as False; accept it as the action `off`."""
    return "off" if value is False else value


Action = Annotated[Literal["redact", "block", "log", "off"], BeforeValidator(_yaml_off)]
InjectionAction = Annotated[Literal["block", "log", "off"], BeforeValidator(_yaml_off)]
Source = Literal["tool_result", "document", "user"]

# Built-in defaults: secrets and PII are redacted; IP addresses are only logged because
# private addresses fill every docker-compose file and stack trace an agent reads.
DEFAULT_ACTIONS: dict[str, Action] = {
    "secret": "redact",
    "pii": "redact",
    "custom": "redact",
    "ipv4": "log",
    "ipv6": "log",
}

_ID = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{value!r}: use lower-case letters, digits and '_' (max 48)")
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from exc
    return value


class CustomRuleConfig(_Frozen):
    """A profile's own rule: exactly one of `regex` or `words`."""

    id: str
    regex: str | None = None
    words: tuple[str, ...] = ()
    case_sensitive: bool = False
    action: Action = "redact"

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @model_validator(mode="after")
    def _one_source(self) -> CustomRuleConfig:
        if (self.regex is None) == (not self.words):
            raise ValueError("set exactly one of regex or words")
        if self.id in BUILTIN_RULES:
            raise ValueError(f"{self.id!r} is a built-in rule id; pick another")
        return self


class MaskingConfig(_Frozen):
    """Reversible masking: matches of these kinds become `[EMAIL_1]`-style placeholders."""

    enabled: bool = False
    kinds: tuple[Kind, ...] = ("pii",)


class InjectionConfig(_Frozen):
    action: InjectionAction = "log"
    threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    sources: tuple[Source, ...] = ("tool_result", "document", "user")
    # `last_turn`: only content after the last assistant message (earlier turns were
    # screened when they were new); `all`: every turn, every request.
    scope: Literal["last_turn", "all"] = "last_turn"
    weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in value.items() if not 0.0 <= w <= 1.0]
        if bad:
            raise ValueError(f"weights must be within 0..1: {bad}")
        return value


class DenyPatternConfig(_Frozen):
    """An output deny rule: a literal `phrase` (case-insensitive) or a bounded `regex`."""

    id: str
    phrase: str | None = None
    regex: str | None = None
    # Longest text the regex can match; defaults to the output `hold_back`.
    max_len: int | None = Field(default=None, ge=1, le=4096)
    action: Literal["block", "redact"] = "block"

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @model_validator(mode="after")
    def _one_source(self) -> DenyPatternConfig:
        if (self.phrase is None) == (self.regex is None):
            raise ValueError("set exactly one of phrase or regex")
        if self.phrase is not None and not self.phrase.strip():
            raise ValueError("phrase must not be blank")
        return self


class OutputConfig(_Frozen):
    strip_secrets: bool = True
    # Upper bound on characters held back for regex deny patterns (phrases and built-in
    # secrets hold back only a possible match prefix).
    hold_back: int = Field(default=128, ge=16, le=4096)
    deny: tuple[DenyPatternConfig, ...] = ()
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_action: Literal["block", "log"] = "log"

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_schema_supported(value)
        return value


class GuardProfileConfig(_Frozen):
    actions: dict[str, Action] = Field(default_factory=dict)
    custom: tuple[CustomRuleConfig, ...] = ()
    allow_values: tuple[str, ...] = ()
    allow_email_domains: tuple[str, ...] = ()
    entropy_threshold: float = Field(default=3.0, ge=1.0, le=6.0)
    scan_tool_definitions: bool = True
    masking: MaskingConfig = MaskingConfig()
    injection: InjectionConfig = InjectionConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("actions")
    @classmethod
    def _actions(cls, value: dict[str, Action]) -> dict[str, Action]:
        unknown = [k for k in value if k not in BUILTIN_RULES and k not in DEFAULT_ACTIONS]
        if unknown:
            raise ValueError(
                f"unknown rule ids {unknown}; use a kind (secret, pii, custom) "
                "or a built-in rule id"
            )
        return value

    @model_validator(mode="after")
    def _unique_custom(self) -> GuardProfileConfig:
        ids = [c.id for c in self.custom] + [d.id for d in self.output.deny]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate custom/deny rule ids {dupes}")
        return self

    def action_for(self, rule: str, kind: Kind) -> Action:
        """The rule's own entry, else its kind's, else the built-in default.

        IP rules keep their `log` default unless named, or unless their kind is `off`.
        """
        if rule in self.actions:
            return self.actions[rule]
        kind_action = self.actions.get(kind, DEFAULT_ACTIONS[kind])
        if rule in DEFAULT_ACTIONS and kind_action != "off":
            return DEFAULT_ACTIONS[rule]
        return kind_action


def _default_profiles() -> dict[str, GuardProfileConfig]:
    return {"default": GuardProfileConfig()}


class GuardConfig(_Frozen):
    # Keys the 4-hex redaction hash so its values cannot be confirmed by guessing.
    # The caller resolves env/file sources (the guard does no I/O): `Guard(cfg, hash_key=...)`.
    hash_key: CredentialSource | None = None
    default_profile: str = "default"
    profiles: dict[str, GuardProfileConfig] = Field(default_factory=_default_profiles)

    @model_validator(mode="after")
    def _default_exists(self) -> GuardConfig:
        if self.default_profile not in self.profiles:
            raise ValueError(
                f"default_profile {self.default_profile!r} is not in profiles "
                f"({sorted(self.profiles)})"
            )
        return self
