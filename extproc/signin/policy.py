"""Per-group policy: which `sso.groups` entry applies to a signed-in user.

The entries are tried in order; the first whose `group` (a shell glob) matches one of
the user's IdP groups wins. Users in none of them get `sso.default`, or are refused
when it is null. The chosen entry becomes the request's identity: its `team` and
`tier` bring in that team's and tier's allow-lists, model mapping, budgets and rate
limits, and its `models` is one more allow-list (intersected with the route's,
the team's and the tier's, like a gateway key's).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from extproc.policies.auth import Identity
from extproc.signin.config import GroupPolicy, SsoConfig
from extproc.signin.tokens import Session


def policy_for(config: SsoConfig, groups: Sequence[str]) -> tuple[str, GroupPolicy] | None:
    """The first matching group policy and its name (the group pattern, or `default`)."""
    for policy in config.groups:
        if any(fnmatchcase(group, policy.group) for group in groups):
            return policy.group, policy
    return ("default", config.default) if config.default is not None else None


def policy_named(config: SsoConfig | None, name: str | None) -> GroupPolicy | None:
    """The policy an identity's `sso_group` label names (what `policy_for` chose)."""
    if config is None or name is None:
        return None
    chosen = next((p for p in config.groups if p.group == name), None)
    return chosen if chosen is not None or name != "default" else config.default


def identity_of(session: Session, name: str, policy: GroupPolicy) -> Identity:
    return Identity(
        source="sso",
        user=session.user,
        team=policy.team,
        project=policy.project,
        tier=policy.tier,
        models=policy.models,
        labels={"sso_group": name},
    )
