"""What a translation could not carry over, and what the route says to do about it.

Some parts of one wire shape have no counterpart in the other: Anthropic's thinking
blocks and their signatures, `cache_control`, server tools (web search, code
execution), documents and citations, beta fields; OpenAI's `n`, `logprobs`, penalties,
`response_format`, audio. Each such part belongs to one *category* (the names in
`CATEGORIES`, which the README lists), and a route's `Lossy` policy says per category
whether it is dropped (noted in `Notes.dropped`, which goes into the audit record) or
refused with a 400 `invalid_request_error` naming the field (`Untranslatable`).

`Notes` is created once per request and passed to the request, answer and stream
translators, so the audit record shows everything dropped in either direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from extproc.errors import BadRequest

__all__ = ["CATEGORIES", "Action", "Lossy", "Notes", "Untranslatable"]

Action = Literal["drop", "refuse"]

# category -> what it covers (the README's table is written from this).
CATEGORIES: Final[Mapping[str, str]] = {
    "thinking": "thinking / redacted_thinking blocks and their signatures",
    "reasoning": "a request to reason (`thinking` config, `output_config.effort`, "
    "`reasoning_effort`) and a provider's reasoning text",
    "cache_control": "`cache_control` marks sent toward a provider without prompt caching",
    "server_tools": "Anthropic server and built-in tools (web_search, code_execution, bash, "
    "text_editor, computer, mcp) and their result blocks",
    "documents": "document blocks (PDF, URL), OpenAI `file` parts and `input_audio`",
    "citations": "citations on text blocks",
    "sampling": "sampling knobs the other side lacks (top_k, penalties, seed, logit_bias, "
    "logprobs, temperature above 1)",
    "response_format": "structured output: OpenAI `response_format`, Anthropic "
    "`output_config.format`",
    "n": "OpenAI `n` > 1 (several choices)",
    "beta": "fields of either shape the translator does not know (beta features, "
    "container, mcp_servers, service_tier, ...)",
    "tool_arguments": "tool-call arguments that are not a JSON object",
    "stream_interleave": "parallel tool-call argument fragments that arrive after the "
    "next call started (sent at the end of the stream to their own block's index, which "
    "the SDKs accumulate by index)",
}


class Untranslatable(BadRequest):
    """A request part the route refuses to translate (status 400, invalid_request_error)."""

    reason = "untranslatable"


@dataclass(frozen=True, slots=True)
class Lossy:
    """Per-category drop/refuse choice; `default` covers categories not listed."""

    default: Action = "drop"
    fields: Mapping[str, Action] = field(default_factory=dict)

    def action(self, category: str) -> Action:
        return self.fields.get(category, self.default)


DROP_ALL: Final = Lossy()


class Notes:
    """Collects `category -> count` of what was dropped; raises where the policy refuses."""

    __slots__ = ("dropped", "policy", "target")

    def __init__(self, policy: Lossy = DROP_ALL, target: str = "the provider") -> None:
        self.policy = policy
        self.target = target
        self.dropped: dict[str, int] = {}

    def drop(self, category: str, where: str) -> None:
        """Record that `where` (a field path) was dropped, or refuse the request."""
        if self.policy.action(category) == "refuse":
            raise Untranslatable(
                f"{where} ({category}) cannot be translated for {self.target}, and this "
                "route refuses to drop it; remove the field or use a route whose provider "
                "speaks your API",
            )
        self.dropped[category] = self.dropped.get(category, 0) + 1

    def note(self, category: str) -> None:
        """Record a loss in an answer (never refused: the provider already answered)."""
        self.dropped[category] = self.dropped.get(category, 0) + 1
