"""`GET /v1/models` in Anthropic's list shape, paginated by the gateway.

The gateway asks the provider for one page of up to 1,000 models, keeps the ones the
caller may use, and pages that list itself with the API's cursors (`after_id`,
`before_id`, `limit` 1-1000, default 20), answering `data`, `has_more`, `first_id`,
`last_id` (platform.claude.com/docs/en/api/models-list). Paging after filtering keeps
`has_more` true to the caller's list, which paging the provider's list could not.
Claude Code's gateway model discovery (`CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1`)
asks `?limit=1000`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from extproc.errors import BadRequest

UPSTREAM_QUERY = "limit=1000"
_MAX_ID = 256


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int = 20
    after_id: str | None = None
    before_id: str | None = None

    @classmethod
    def parse(cls, query: str) -> PageRequest:
        """The caller's cursors; 400 for a limit outside 1-1000 or both cursors."""
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        raw = params.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise BadRequest(f"limit must be an integer from 1 to 1000, got {raw[:20]!r}")
        after, before = params.get("after_id"), params.get("before_id")
        if after is not None and before is not None:
            raise BadRequest("send after_id or before_id, not both")
        if any(len(cursor) > _MAX_ID for cursor in (after or "", before or "")):
            raise BadRequest(f"after_id / before_id are at most {_MAX_ID} characters")
        return cls(int(raw), after, before)


def _entry(model: Mapping[str, Any]) -> dict[str, Any]:
    """One model in the list shape; `display_name` falls back to the id."""
    model_id = str(model["id"])
    entry = dict(model)
    entry.setdefault("type", "model")
    entry.setdefault("display_name", model_id)
    entry.setdefault("created_at", "1970-01-01T00:00:00Z")
    return entry


def page(listed: list[Any], request: PageRequest, visible: Callable[[str], bool]) -> dict[str, Any]:
    """The caller's page of the provider's list, keeping only what `visible` allows."""
    models = [
        _entry(m) for m in listed if isinstance(m, Mapping) and "id" in m and visible(str(m["id"]))
    ]
    ids = [m["id"] for m in models]
    if request.before_id is not None:
        end = ids.index(request.before_id) if request.before_id in ids else 0
        start = max(0, end - request.limit)
        chosen, more = models[start:end], start > 0
    else:
        start = ids.index(request.after_id) + 1 if request.after_id in ids else 0
        if request.after_id is not None and request.after_id not in ids:
            start = len(ids)
        chosen = models[start : start + request.limit]
        more = start + request.limit < len(models)
    return {
        "data": chosen,
        "has_more": more,
        "first_id": chosen[0]["id"] if chosen else None,
        "last_id": chosen[-1]["id"] if chosen else None,
    }
