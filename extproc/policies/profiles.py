"""Per-route policy: the profile Envoy route metadata names, with its overrides.

A route says, in its metadata, `filter_metadata: {extproc: {profile: agent}}`
and may override any profile field (`models`, `map`, `pin`, `provider`,
`refuse`). The result is validated like the config file; a bad route policy is
an operator error answered with 503 and a message that names the route.
Compiled profiles are memoised per distinct metadata, so this runs once per
route, not per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import orjson
from pydantic import ValidationError

from extproc.config import Config, ProfileConfig
from extproc.errors import Unavailable


class RoutePolicyError(Unavailable):
    reason = "route_policy_invalid"


def _compile(config: Config, raw: bytes) -> ProfileConfig:
    metadata: dict[str, Any] = orjson.loads(raw)
    name = metadata.pop("profile", "default")
    if "fallback" in metadata:
        # Envoy's clusters for a chain are rendered from the config file's profiles.
        raise ValueError("fallback cannot be set in route metadata; set it in the profile")
    base = config.profiles.get(name)
    if base is None:
        known = ", ".join(config.profiles)
        raise ValueError(f"profile {name!r} is not in the config's profiles (known: {known})")
    try:
        profile = ProfileConfig.model_validate({**base.model_dump(), **metadata})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from exc
    if base.zero_data_retention and not profile.zero_data_retention:
        raise ValueError(f"route metadata cannot turn off zero_data_retention of profile {name!r}")
    if profile.provider is not None and profile.provider not in config.providers:
        raise ValueError(f"provider {profile.provider!r} is not in the config's providers")
    return profile


class ProfileResolver:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._compile = lru_cache(maxsize=1024)(self._compile_raw)

    def _compile_raw(self, raw: bytes) -> ProfileConfig | str:
        try:
            return _compile(self._config, raw)
        except ValueError as exc:
            return str(exc)

    def resolve(self, metadata: Mapping[str, Any] | None, route_name: str) -> ProfileConfig:
        # A route without a policy (most): the same key without building and encoding one.
        raw = orjson.dumps(dict(metadata), option=orjson.OPT_SORT_KEYS) if metadata else b"{}"
        result = self._compile(raw)
        if isinstance(result, str):
            raise RoutePolicyError(f"the policy of Envoy route {route_name!r} is invalid: {result}")
        return result
