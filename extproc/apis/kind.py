"""The names of the wire schemas the gateway speaks: declared here once.

A name picks a `Dialect` (`extproc.apis.dialect.dialect_of`) and, for a provider's
`api:` in the config, an upstream adapter (`extproc.upstream.adapter_for`). It is also
what the audit record's `api` field, the metrics' `api` label and a cache entry store.
A new client schema (say Bedrock invoke) adds its name here and registers its dialect.
"""

from __future__ import annotations

from typing import Literal

ApiKind = Literal["anthropic", "openai", "bedrock", "vertex"]

# The schemas only a cloud serves: a provider with one of these needs its `cloud:` settings.
CLOUD_APIS: frozenset[ApiKind] = frozenset({"bedrock", "vertex"})

__all__ = ["CLOUD_APIS", "ApiKind"]
