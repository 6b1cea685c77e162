"""Envoy's downstream connection cap against the file-descriptor limit (`extproc up`).

A connection flood (slowloris) must hit Envoy's overload-manager cap, where Envoy
refuses new connections and keeps serving the open ones, before it hits the
process's file-descriptor limit, where accept() and every upstream connect fail.
Each downstream connection can need one upstream connection (HTTP/1.1 providers),
so the cap may use at most half of the descriptors, less a reserve for the
ext_proc, admin and log descriptors.
"""

from __future__ import annotations

import resource

RESERVE = 256
MINIMUM = 16


class FdLimitError(Exception):
    """The descriptor limit cannot hold the connection cap."""


def raise_soft_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (children inherit
    it); return the resulting limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def needed(connections: int) -> int:
    return 2 * connections + RESERVE


def connection_cap(configured: int | None, template_cap: int | None, limit: int) -> int:
    """The cap to run with: the configured one if the limit holds it, else derived from
    the limit (never above the template's own value)."""
    if configured is not None:
        if needed(configured) > limit:
            raise FdLimitError(
                f"envoy.max_connections is {configured}, which needs {needed(configured)} file "
                f"descriptors (two per connection + {RESERVE}), but this process may open "
                f"{limit}. Raise the limit (ulimit -n, LimitNOFILE=, docker --ulimit nofile=) "
                f"or set envoy.max_connections to at most {(limit - RESERVE) // 2}."
            )
        return configured
    derived = (limit - RESERVE) // 2
    if derived < MINIMUM:
        raise FdLimitError(
            f"the file-descriptor limit is {limit}, too low for Envoy to serve even "
            f"{MINIMUM} connections; raise it (ulimit -n, LimitNOFILE=, docker --ulimit nofile=)"
        )
    return min(derived, template_cap) if template_cap is not None else derived
