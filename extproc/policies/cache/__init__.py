"""The cache step: `key` is its pure core (the key, the stored entry, cache-key hygiene),
`run` its store I/O and its place on the request path (`ResponseCache`, `CacheRun`:
single-flight lookup, store after the answer). The config section is `CacheConfig` /
`CacheSettings` in `extproc.config`."""

from extproc.policies.cache.key import (
    DIRECTORIES,
    KEY_VERSION,
    Entry,
    Shape,
    cache_key,
    format_path,
)
from extproc.policies.cache.run import (
    SHAPE_MAX_BODY,
    SHAPE_MAX_ENTRY,
    SHAPE_PREFIX,
    CacheRun,
    ResponseCache,
    cache_control,
    entry_name,
    tenant_scope,
)

__all__ = [
    "DIRECTORIES",
    "KEY_VERSION",
    "SHAPE_MAX_BODY",
    "SHAPE_MAX_ENTRY",
    "SHAPE_PREFIX",
    "CacheRun",
    "Entry",
    "ResponseCache",
    "Shape",
    "cache_control",
    "cache_key",
    "entry_name",
    "format_path",
    "tenant_scope",
]
