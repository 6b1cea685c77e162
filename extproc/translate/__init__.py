"""Anthropic Messages ⇄ OpenAI Chat Completions translation: pure, no I/O.

A client speaking one wire shape can be served by a provider speaking the other.
Each direction is one module with three pieces (request, JSON answer, stream):

* `anthropic_on_openai`: an Anthropic client (Claude Code, the anthropic SDK) on an
  OpenAI-compatible provider (OpenAI, vLLM, Ollama, KServe).
* `openai_on_anthropic`: an OpenAI client (the openai SDK, OpenAI-shaped tools) on an
  Anthropic provider.

Stream translators work on parsed event dicts, not bytes: the framing (SSE) turns bytes
into events and back, so a translator never sees a chunk boundary. What one shape cannot
express is dropped or refused per route (`notes.Lossy`), and every drop is counted in
`notes.Notes` for the audit record. `common` holds the stop-reason, usage and error
tables both directions share.
"""

from extproc.translate.notes import CATEGORIES, Action, Lossy, Notes, Untranslatable

__all__ = ["CATEGORIES", "Action", "Lossy", "Notes", "Untranslatable"]
