"""Reconcile Envoy's access log with the audit log: a record for every stream Envoy opened.

The ext_proc server audits every request whose first message it read. A client that
hangs up within milliseconds of sending can have its gRPC stream reset before that
(without ext_proc_graceful_grpc_close; the server then never learns the request id); and
the server cannot tell a client abort from a provider reset (Envoy closes its gRPC stream
alike for both), so it records a cut stream as `client_abort`. Envoy's access log
(envoy/front-proxy.yaml, `envoy.access_log`) has one line per request with
`x-request-id` (the audit `request_id`) and the response flags, which say which side
ended it. `reconcile` joins the two (pure; `extproc reconcile` is the command):

* a request in the access log without an audit record gets one, `source: envoy`, with its
  outcome from the flags. Nothing was admitted or charged for it: the server never saw
  its body, so no budget was held.
* an audit record `client_abort` or `provider_reset` whose flags name the other side
  is corrected: `client_abort` (flag DC, downstream connection termination) or
  `provider_reset` (UR, UC, UPE, ...: the upstream reset or closed the connection, or
  broke the protocol).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["cause", "read_json_lines", "reconcile"]

# Envoy response flags (access log %RESPONSE_FLAGS%) that put the end on the provider side.
_PROVIDER_FLAGS = frozenset({"UR", "UC", "UF", "UH", "UO", "UPE", "URX", "UT", "UMSDR"})
_CLIENT_FLAGS = frozenset({"DC", "DPE", "DT"})
_CUT = frozenset({"client_abort", "provider_reset", "interrupted"})


def cause(flags: str | None) -> str | None:
    """`provider_reset`, `client_abort` or None, from Envoy's comma-separated flags."""
    names = set((flags or "").split(","))
    if names & _PROVIDER_FLAGS:
        return "provider_reset"
    if names & _CLIENT_FLAGS:
        return "client_abort"
    return None


def _missing_record(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "time": entry.get("time"),
        "request_id": entry.get("request_id"),
        "path": str(entry.get("path") or "").split("?", 1)[0],
        "status": entry.get("status"),
        "outcome": cause(entry.get("flags")) or "unaudited",
        "flags": entry.get("flags"),
        "details": entry.get("details"),
        "source": "envoy",
        "reconciled": "missing",
    }


def reconcile(
    access: Iterable[Mapping[str, Any]], audit: Iterable[Mapping[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Records to add (requests only Envoy saw) and corrected causes of cut streams."""
    audited = {str(r.get("request_id")): r for r in audit}
    for entry in access:
        request_id = str(entry.get("request_id") or "")
        if not request_id or request_id == "-":
            continue
        record = audited.get(request_id)
        if record is None:
            yield _missing_record(entry)
        elif record.get("outcome") in _CUT and cause(entry.get("flags")) not in (
            None,
            record.get("outcome"),
        ):
            yield {
                "request_id": request_id,
                "outcome": cause(entry.get("flags")),
                "flags": entry.get("flags"),
                "reconciled": "cause",
            }


def read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log, one a line; other lines (Envoy's own logs) are skipped."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    yield value
