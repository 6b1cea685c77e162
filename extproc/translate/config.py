"""A route's translation settings (`profiles.NAME.translation` in the config file).

Used only when the route's provider speaks the other wire shape than the caller.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc.translate.notes import CATEGORIES, Action, Lossy

__all__ = ["TranslationConfig"]


class TranslationConfig(BaseModel):
    """What to do with what one shape cannot express, and per-direction options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # What happens to an untranslatable part (see extproc.translate.notes.CATEGORIES):
    # `drop` it (counted in the audit record's `translation_dropped`) or `refuse` the
    # request with a 400 naming the field. `refuse`/`drop` list categories that differ.
    untranslatable: Action = "drop"
    refuse: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    # Anthropic client on an OpenAI provider: the field the output limit goes in
    # (OpenAI's reasoning models take only max_completion_tokens; older servers only
    # max_tokens).
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # OpenAI client on an Anthropic provider: `max_tokens` when the client sent none
    # (Anthropic requires it), and whether to mark the stable prefix (tools, system,
    # conversation) with `cache_control` so Anthropic caches it.
    default_max_tokens: int = Field(default=4096, ge=1, le=1_000_000)
    cache_prefix: bool = False

    @field_validator("refuse", "drop")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> TranslationConfig:
        both = set(self.refuse) & set(self.drop)
        if both:
            raise ValueError(f"categories {sorted(both)} are in both 'refuse' and 'drop'")
        return self

    def lossy(self) -> Lossy:
        fields: dict[str, Action] = dict.fromkeys(self.refuse, "refuse")
        fields.update(dict.fromkeys(self.drop, "drop"))
        return Lossy(default=self.untranslatable, fields=fields)
