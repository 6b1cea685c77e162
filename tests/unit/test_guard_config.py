"""Guard config: the documented YAML shape validates; mistakes name key and fix."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from extproc.policies.guard import Guard, GuardConfig
from extproc.policies.guard import config as guard_config
from extproc.policies.guard.config import GuardProfileConfig

YAML = """
hash_key: {value: not-so-secret}
default_profile: strict
profiles:
  default: {}
  strict:
    actions: {secret: block, email: redact, ipv4: off}
    allow_values: ["support@mycorp.com"]
    allow_email_domains: ["mycorp.test"]
    custom:
      - {id: project_codename, words: ["Project Falcon"], action: redact}
      - {id: internal_host, regex: '\\b[a-z0-9-]+\\.corp\\.internal\\b', action: log}
    masking: {enabled: true, kinds: [pii, custom]}
    injection: {action: block, threshold: 0.7, sources: [tool_result], scope: all}
    output:
      hold_back: 96
      deny:
        - {id: no_rm_rf, phrase: "rm -rf /", action: block}
        - {id: ticket, regex: 'JIRA-[0-9]{1,6}', max_len: 16, action: redact}
      schema: {type: object, required: [answer], properties: {answer: {type: string}}}
      schema_action: block
"""


def test_documented_yaml_shape_compiles() -> None:
    cfg = GuardConfig.model_validate(yaml.safe_load(YAML))
    guard = Guard(cfg)
    strict = guard.profile()
    assert strict.name == "strict"
    body = {
        "messages": [{"role": "user", "content": "Project Falcon ships; mail bob@acme-corp.io"}]
    }
    result = strict.redact_request(body, "anthropic")
    assert result.body is not None
    assert result.body["messages"][0]["content"] == "[PROJECT_CODENAME_1] ships; mail [EMAIL_1]"
    assert strict.check_structured('{"answer": "x"}') is not None
    assert guard.profile("default").redact_request(body, "anthropic").changed


@pytest.mark.parametrize(
    ("profile", "fragment"),
    [
        ({"actions": {"nope": "redact"}}, "unknown rule ids"),
        ({"actions": {"email": "explode"}}, "actions.email"),
        ({"custom": [{"id": "x1", "regex": "(", "action": "log"}]}, "invalid regex"),
        ({"custom": [{"id": "x1"}]}, "exactly one of regex or words"),
        ({"custom": [{"id": "email", "words": ["a"]}]}, "built-in rule id"),
        (
            {"output": {"deny": [{"id": "d", "phrase": "a", "regex": "b"}]}},
            "exactly one of phrase or regex",
        ),
        ({"output": {"schema": {"type": "object", "if": {}}}}, "unsupported JSON Schema keywords"),
        ({"injection": {"threshold": 0}}, "threshold"),
        ({"masking": {"enabled": True, "typo": 1}}, "typo"),
    ],
)
def test_bad_profiles_are_rejected_with_the_key(profile: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig.model_validate({"profiles": {"default": profile}})
    assert fragment in str(info.value)


def test_default_profile_must_exist() -> None:
    with pytest.raises(ValidationError, match="default_profile"):
        GuardConfig.model_validate({"default_profile": "x"})


def test_action_resolution() -> None:
    p = GuardProfileConfig.model_validate({"actions": {"pii": "block", "email": "log"}})
    assert p.action_for("email", "pii") == "log"
    assert p.action_for("phone", "pii") == "block"
    assert p.action_for("ipv4", "pii") == "log"  # IPs keep their default unless named
    assert (
        GuardProfileConfig.model_validate({"actions": {"pii": "off"}}).action_for("ipv6", "pii")
        == "off"
    )
    assert GuardProfileConfig().action_for("github_token", "secret") == "redact"


def test_yaml_shape_in_the_module_docstring_is_valid() -> None:
    doc = guard_config.__doc__ or ""
    block = doc.split("YAML shape (under the gateway config's `guard:` key)::", 1)[1]
    lines = [line[4:] for line in block.split("\n\n`actions`")[0].splitlines() if line.strip()]
    data = yaml.safe_load("\n".join(lines))["guard"]
    guard = Guard(GuardConfig.model_validate(data), hash_key=b"k")
    assert guard.profile().name == "default"


def test_hash_key_changes_placeholders() -> None:
    body = {"messages": [{"role": "user", "content": "mail bob@acme-corp.io"}]}
    plain = Guard().profile().redact_request(body, "anthropic").body
    keyed = Guard(hash_key=b"secret").profile().redact_request(body, "anthropic").body
    assert plain is not None
    assert keyed is not None
    assert plain != keyed
