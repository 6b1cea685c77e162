"""`GET /v1/models` answers across shapes, and the names a mapping makes usable.

A caller asks for the list in its own shape; the provider answers in its own:

* `to_openai_list(body)`: Anthropic's `{"data": [{"type": "model", "id", "display_name",
  "created_at"}], "has_more", "first_id", "last_id"}` as OpenAI's
  `{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}`;
* `to_anthropic_list(body)`: the reverse (the gateway pages it afterwards).

`literal_names(rules)` gives the requested names a mapping serves (an alias or a
`map` rule without wildcards: `gpt-4 -> claude-sonnet-4-6` makes `gpt-4` usable), so a
caller sees the names it can ask for.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "anthropic_model",
    "listed_entry",
    "literal_names",
    "openai_model",
    "to_anthropic_list",
    "to_openai_list",
]

_EPOCH = "1970-01-01T00:00:00Z"


def _unix(created_at: object) -> int:
    if not isinstance(created_at, str):
        return 0
    try:
        return int(dt.datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _iso(created: object) -> str:
    if not isinstance(created, int) or isinstance(created, bool) or created <= 0:
        return _EPOCH
    return dt.datetime.fromtimestamp(created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _models(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    data = body.get("data")
    if not isinstance(data, list):
        return []
    return [m for m in data if isinstance(m, Mapping) and isinstance(m.get("id"), str)]


def openai_model(model: Mapping[str, Any], owner: str = "anthropic") -> dict[str, Any]:
    """One Anthropic model object (`GET /v1/models/{id}`) as OpenAI's."""
    created = _unix(model.get("created_at"))
    return {"id": model.get("id"), "object": "model", "created": created, "owned_by": owner}


def anthropic_model(model: Mapping[str, Any]) -> dict[str, Any]:
    """One OpenAI model object as Anthropic's."""
    model_id = model.get("id")
    created = _iso(model.get("created"))
    return {"type": "model", "id": model_id, "display_name": model_id, "created_at": created}


def to_openai_list(body: Mapping[str, Any], owner: str = "anthropic") -> dict[str, Any]:
    return {"object": "list", "data": [openai_model(m, owner) for m in _models(body)]}


def to_anthropic_list(body: Mapping[str, Any]) -> dict[str, Any]:
    data = [anthropic_model(m) for m in _models(body)]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def literal_names(rules: Iterable[str]) -> list[str]:
    """The rule patterns that name one model (no glob characters), in order."""
    return [name for name in rules if not any(c in name for c in "*?[")]


def listed_entry(api: str, model_id: str) -> dict[str, Any]:
    """A model-list entry for a name the gateway serves by mapping, in `api`'s shape."""
    if api == "openai":
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "gateway"}
    return {"type": "model", "id": model_id, "display_name": model_id, "created_at": _EPOCH}
