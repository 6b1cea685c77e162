"""What every policy step hands the audit record.

A request runs its steps in a fixed order: auth (`Identity`), model policy, guard
(`GuardRun`), cache (`CacheRun`), spend (`SpendRun`), then forwards. When the request is
done each step that ran returns its own audit fields (`audit_fields(done)`), and
`extproc.telemetry.record` merges them over the request's own facts in that order: the
record never reaches into a step's state, and a new step adds its fields by
implementing this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.apis.usage import Usage

__all__ = ["Done", "Step"]


@dataclass(frozen=True, slots=True)
class Done:
    """How the request ended, as every step sees it."""

    outcome: str
    usage: Usage  # what it is billed for (an estimate when the final usage never came)


class Step(Protocol):
    def audit_fields(self, done: Done) -> Mapping[str, Any]: ...
