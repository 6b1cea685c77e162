"""What every policy step hands the audit record.

A request runs its steps in a fixed order: auth (`Identity`), model policy, guard
(`GuardRun`), cache (`CacheRun`), spend (`SpendRun`), then forwards. When the request is
done, the steps with work after the answer close in that order (`Closing.close`: the
cache stores it, spend settles), then each step that ran returns its own audit fields
(`audit_fields(done)`), and
`extproc.telemetry.record` merges them over the request's own facts in that order: the
record never reaches into a step's state, and a new step adds its fields by
implementing this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.apis.kind import ApiKind
from extproc.apis.usage import Usage

__all__ = ["Closing", "Done", "Ending", "Step"]


@dataclass(frozen=True, slots=True)
class Done:
    """How the request ended, as every step sees it."""

    outcome: str
    usage: Usage  # what it is billed for (an estimate when the final usage never came)


class Step(Protocol):
    def audit_fields(self, done: Done) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Ending:
    """What the steps that act after the answer (cache, spend) are given at close."""

    outcome: str
    api: ApiKind  # the wire schema the answer is in
    answer: dict[str, Any] | None  # the complete successful answer as JSON, else None
    billable: Usage  # what the request is charged for


class Closing(Protocol):
    """A step with work after the answer, run in step order once the RPC has ended."""

    async def close(self, ending: Ending) -> None: ...
