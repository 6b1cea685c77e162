"""Token usage in one provider-neutral shape.

`Usage` follows Anthropic's split, which prices cleanly: `input_tokens` are
uncached prompt tokens, and cache writes and cache reads are counted apart from
them (so the four counts never overlap, and `total_tokens` is their sum).
OpenAI's `prompt_tokens` include cached tokens; `extproc.apis.openai` subtracts
them when it converts.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.slots import slot_init

__all__ = ["Usage", "as_count"]


@slot_init
@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one model call; all fields are non-negative."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The part of cache_creation_input_tokens written for one hour (dearer than 5 minutes).
    cache_creation_1h_input_tokens: int = 0
    # Server tools billed per use (Anthropic's web search).
    web_search_requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
            self.cache_creation_1h_input_tokens + other.cache_creation_1h_input_tokens,
            self.web_search_requests + other.web_search_requests,
        )

    @property
    def prompt_tokens(self) -> int:
        """Every input token of the call, cached or not (what a long-context tier counts)."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def total_tokens(self) -> int:
        """Every token the call consumed or produced, cached or not."""
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )


def as_count(value: object) -> int:
    """A token count from untrusted JSON: a non-negative int, else 0 (null, missing, junk)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value.is_integer():
        return max(int(value), 0)
    return 0
